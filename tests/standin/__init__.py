"""Stand-ins for the tests: a runner process that loads no model, and the factory that starts it for the
scheduler. They replace only the engine; the scheduler, the process handling and the HTTP are the real ones."""
