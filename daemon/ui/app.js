// mgr's web console: plain JavaScript over the daemon's own API (/api/*, /metrics), no build step, nothing
// loaded from elsewhere. Conversations and the API key live in this browser's localStorage.
"use strict";

// ---------------------------------------------------------------------------------------------------------------
// small DOM helpers: every text goes in as a text node, never as HTML
const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes <= 0) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const power = Math.min(units.length - 1, Math.floor(Math.log(bytes) / Math.log(1000)));
  const value = bytes / 1000 ** power;
  return `${value >= 100 || power === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[power]}`;
}

function formatSeconds(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function relativeTime(iso) {
  const then = Date.parse(iso);
  if (!Number.isFinite(then)) return "";
  const seconds = (then - Date.now()) / 1000;
  const words = formatSeconds(Math.abs(seconds));
  return seconds >= 0 ? `in ${words}` : `${words} ago`;
}

let toastTimer = null;
function toast(message) {
  const box = $("#toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
}

// ---------------------------------------------------------------------------------------------------------------
// the API: the key as Bearer, errors as the daemon words them
const KEY_STORAGE = "mgr.apiKey";

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.error === "string") return body.error;
    if (body.error && typeof body.error.message === "string") return body.error.message;
  } catch { /* not JSON: the text itself */ }
  return text || `${response.status} ${response.statusText}`;
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) askForKey(message);
    throw new ApiError(response.status, message);
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// one JSON object per line, as the lines arrive
async function* ndjson(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

function askForKey(message) {
  const dialog = $("#key-dialog");
  $("#key-message").textContent = message || "";
  $("#key-input").value = "";
  $("#key-button").hidden = false;
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

function setUpKeyDialog() {
  const dialog = $("#key-dialog");
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORAGE, key);
    dialog.close();
    refreshEverything();
  });
  $("#key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("#key-message").textContent = "The key is forgotten.";
  });
  $("#key-button").addEventListener("click", () => askForKey(""));
}

// ---------------------------------------------------------------------------------------------------------------
// dialogs: confirm and ask, as promises
function confirmAction(message, okLabel = "Delete") {
  const dialog = $("#confirm-dialog");
  $("#confirm-message").textContent = message;
  $("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("#confirm-cancel").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

function askText(message, value = "") {
  const dialog = $("#ask-dialog");
  $("#ask-message").textContent = message;
  const input = $("#ask-input");
  input.value = value;
  dialog.returnValue = "";
  dialog.showModal();
  input.select();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? input.value.trim() : null),
      { once: true });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// tabs (the address's #hash keeps the view across a reload)
const VIEWS = ["chat", "models", "running", "logs"];
let currentView = "chat";

function showView(name, focusTab = false, refresh = true) {
  if (!VIEWS.includes(name)) name = "chat";
  currentView = name;
  for (const view of VIEWS) {
    const tab = $(`#tab-${view}`);
    const selected = view === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#view-${view}`).hidden = !selected;
  }
  if (focusTab) $(`#tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (!refresh) return;
  if (name === "models") refreshModels();
  if (name === "running") {
    refreshRunning();
    sampleMetrics().catch(() => {});
  }
  if (name === "logs") showLogs();
  else stopLogs();
}

function setUpTabs() {
  for (const view of VIEWS) $(`#tab-${view}`).addEventListener("click", () => showView(view));
  $(".tabs").addEventListener("keydown", (event) => {
    const index = VIEWS.indexOf(currentView);
    if (event.key === "ArrowRight") showView(VIEWS[(index + 1) % VIEWS.length], true);
    else if (event.key === "ArrowLeft") showView(VIEWS[(index + VIEWS.length - 1) % VIEWS.length], true);
    else return;
    event.preventDefault();
  });
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
}

// ---------------------------------------------------------------------------------------------------------------
// Markdown: a small safe subset (code blocks, inline code, headings, lists, quotes, bold, italic, links),
// built as DOM nodes; nothing the model writes is ever parsed as HTML
function renderInline(text, parent) {
  const pattern = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*|__[^_\n]+__)|(\*[^*\s][^*\n]*\*|_[^_\s][^_\n]*_)|(\[[^\]\n]+\]\(https?:\/\/[^)\s]+\))/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const token = match[0];
    if (match[1]) parent.append(el("code", { text: token.slice(1, -1) }));
    else if (match[2]) renderInline(token.slice(2, -2), parent.appendChild(el("strong")));
    else if (match[3]) renderInline(token.slice(1, -1), parent.appendChild(el("em")));
    else {
      const close = token.indexOf("](");
      parent.append(el("a", { href: token.slice(close + 2, -1), target: "_blank", rel: "noopener noreferrer" },
        token.slice(1, close)));
    }
    last = match.index + token.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function codeBlock(code, language) {
  const pre = el("pre", {}, el("code", { class: language ? `language-${language}` : undefined, text: code }));
  pre.append(el("button", {
    type: "button", class: "copy", text: "Copy", "aria-label": "Copy the code",
    onclick: () => navigator.clipboard?.writeText(code).then(() => toast("Copied")),
  }));
  return pre;
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;
  const flush = () => {
    if (paragraph.length) {
      const p = el("p");
      paragraph.forEach((line, i) => {
        if (i) p.append(el("br"));
        renderInline(line, p);
      });
      root.append(p);
      paragraph = [];
    }
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)/);
    if (fence) {
      flush();
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
      root.append(codeBlock(code.join("\n"), fence[2]));  // an unclosed fence (still streaming) runs to the end
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    const quote = line.match(/^>\s?(.*)$/);
    if (heading) {
      flush();
      renderInline(heading[2], root.appendChild(el(`h${Math.min(4, heading[1].length + 1)}`)));
    } else if (bullet || numbered) {
      if (paragraph.length) flush();
      const kind = bullet ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== kind) list = root.appendChild(el(kind));
      renderInline((bullet || numbered)[1], list.appendChild(el("li")));
    } else if (quote) {
      flush();
      renderInline(quote[1], root.appendChild(el("blockquote")));
    } else if (/^\s*([-*_])\s*\1\s*\1[\s\-*_]*$/.test(line)) {
      flush();
      root.append(el("hr"));
    } else if (!line.trim()) {
      flush();
    } else {
      list = null;
      paragraph.push(line);
    }
  }
  flush();
  return root;
}

// ---------------------------------------------------------------------------------------------------------------
// models (shared by the chat's picker, the models table and the logs' picker)
let models = [];  // /api/tags' models
const shown = new Map();  // name -> /api/show's answer

async function loadModels() {
  const answer = await apiJson("/api/tags");
  models = answer.models || [];
  fillModelPickers();
  return models;
}

async function showModel(name) {
  if (!shown.has(name)) shown.set(name, await apiJson("/api/show", { method: "POST", body: { model: name } }));
  return shown.get(name);
}

function fillModelPickers() {
  for (const select of [$("#chat-model"), $("#logs-model")]) {
    const keep = select.value;
    select.replaceChildren(...models.map((m) => el("option", { value: m.name, text: m.name })));
    if (!models.length) select.append(el("option", { value: "", text: "no models yet" }));
    if (models.some((m) => m.name === keep)) select.value = keep;
  }
  const conversation = currentConversation();
  if (conversation?.model && models.some((m) => m.name === conversation.model)) {
    $("#chat-model").value = conversation.model;
  }
  showCapabilities();
}

async function showCapabilities() {
  const name = $("#chat-model").value;
  const box = $("#chat-model-caps");
  box.replaceChildren();
  if (!name) return;
  try {
    const info = await showModel(name);
    if ($("#chat-model").value !== name) return;
    box.replaceChildren(...(info.capabilities || []).map((c) => el("span", { class: "cap", text: c })));
    $("#attach-label").title = (info.capabilities || []).includes("vision") ? "" : `${name} does not take images`;
  } catch { /* shown by the chat when it is used */ }
}

// ---------------------------------------------------------------------------------------------------------------
// chat
const CONVERSATIONS = "mgr.conversations";
const CURRENT = "mgr.currentConversation";
const OPTION_FIELDS = ["temperature", "top_p", "top_k", "num_ctx", "num_predict", "seed"];
let conversations = [];
let currentId = null;
let generating = null;  // {controller, answer} while an answer streams
let pendingImages = [];  // base64 of images attached to the next message

function newId() {
  return `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

function loadConversations() {
  try {
    conversations = JSON.parse(localStorage.getItem(CONVERSATIONS) || "[]");
  } catch {
    conversations = [];
  }
  if (!Array.isArray(conversations)) conversations = [];
  currentId = localStorage.getItem(CURRENT);
  if (!conversations.some((c) => c.id === currentId)) currentId = conversations[0]?.id ?? null;
  if (!currentId) newConversation(false);
}

function saveConversations() {
  localStorage.setItem(CURRENT, currentId || "");
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(conversations));
  } catch {  // the browser's quota: the images go, the words stay
    const light = conversations.map((c) => ({
      ...c, messages: c.messages.map((m) => ({ ...m, images: m.images?.length ? [] : undefined })),
    }));
    try {
      localStorage.setItem(CONVERSATIONS, JSON.stringify(light));
      toast("The browser's storage is full: images are not kept with the conversations");
    } catch {
      toast("The browser's storage is full: delete some conversations");
    }
  }
}

function currentConversation() {
  return conversations.find((c) => c.id === currentId) || null;
}

function newConversation(focus = true) {
  const previous = currentConversation();
  const conversation = {
    id: newId(), title: "New chat", model: previous?.model || $("#chat-model")?.value || "",
    system: previous?.system || "", options: { ...(previous?.options || {}) }, messages: [], created: Date.now(),
  };
  conversations.unshift(conversation);
  currentId = conversation.id;
  saveConversations();
  if (focus) {
    renderConversation();
    $("#prompt").focus();
  }
}

function renderConversationList() {
  const list = $("#conversation-list");
  list.replaceChildren(...conversations.map((c) => el("li", { "aria-current": String(c.id === currentId) },
    el("button", {
      type: "button", class: "open", title: c.title, text: c.title,
      onclick: () => { selectConversation(c.id); },
    }),
    el("button", {
      type: "button", class: "small", text: "✎", title: "Rename", "aria-label": `Rename ${c.title}`,
      onclick: async () => {
        const title = await askText("New name", c.title);
        if (title) {
          c.title = title;
          saveConversations();
          renderConversationList();
        }
      },
    }),
    el("button", {
      type: "button", class: "small", text: "✕", title: "Delete", "aria-label": `Delete ${c.title}`,
      onclick: async () => {
        if (!await confirmAction(`Delete the conversation "${c.title}"?`)) return;
        conversations = conversations.filter((other) => other !== c);
        if (currentId === c.id) currentId = conversations[0]?.id ?? null;
        if (!currentId) newConversation(false);
        saveConversations();
        renderConversation();
      },
    }))));
}

function selectConversation(id) {
  if (generating) stopAnswer();
  currentId = id;
  saveConversations();
  renderConversation();
}

function readSettings(conversation) {
  conversation.system = $("#opt-system").value;
  const options = {};
  for (const field of OPTION_FIELDS) {
    const value = $(`#opt-${field}`).value;
    if (value !== "") options[field] = Number(value);
  }
  options.think = $("#opt-think").value;
  options.keep_alive = $("#opt-keep_alive").value.trim();
  conversation.options = options;
  conversation.model = $("#chat-model").value || conversation.model;
}

function writeSettings(conversation) {
  $("#opt-system").value = conversation.system || "";
  for (const field of OPTION_FIELDS) {
    const value = conversation.options?.[field];
    $(`#opt-${field}`).value = value === undefined ? "" : String(value);
  }
  $("#opt-think").value = conversation.options?.think || "";
  $("#opt-keep_alive").value = conversation.options?.keep_alive || "";
  if (conversation.model && models.some((m) => m.name === conversation.model)) {
    $("#chat-model").value = conversation.model;
  }
}

function renderConversation() {
  const conversation = currentConversation();
  renderConversationList();
  writeSettings(conversation);
  showCapabilities();
  const box = $("#messages");
  box.replaceChildren();
  if (!conversation.messages.length) {
    box.append(el("p", { class: "empty-chat", text: "Ask something. Answers stream in as they are written." }));
  }
  for (const message of conversation.messages) box.append(messageNode(message));
  box.scrollTop = box.scrollHeight;
}

function messageNode(message) {
  const node = el("article", { class: `message ${message.role}`, "aria-label": message.role === "user" ? "You" : "Answer" });
  fillMessage(node, message);
  messageNodes.set(message, node);
  return node;
}

function imageUrl(base64) {  // the type from the first bytes, as the daemon reads it
  const type = base64.startsWith("/9j/") ? "jpeg" : base64.startsWith("R0lG") ? "gif"
    : base64.startsWith("UklG") ? "webp" : "png";
  return `data:image/${type};base64,${base64}`;
}

function fillMessage(node, message) {
  const reasoningOpen = node.querySelector(".thinking")?.open;
  node.replaceChildren();
  if (message.role === "user") {
    node.append(message.content);
    for (const image of message.images || []) node.append(el("img", { src: imageUrl(image), alt: "attached image" }));
    return;
  }
  if (message.thinking) {
    node.append(el("details", { class: "thinking", open: reasoningOpen || undefined },
      el("summary", { text: message.done ? "Reasoning" : "Reasoning…" }), el("div", { text: message.thinking })));
  }
  const body = el("div", { class: "content" });
  body.append(renderMarkdown(message.content || ""));
  if (!message.done && !message.error) body.classList.add("typing");
  node.append(body);
  for (const call of message.tool_calls || []) {
    const fn = call.function || {};
    node.append(el("div", { class: "tool-call" }, el("strong", { text: `Tool call: ${fn.name || "?"}` }),
      el("pre", { text: JSON.stringify(fn.arguments ?? {}, null, 2) })));
  }
  if (message.error) node.append(el("p", { class: "error", role: "alert", text: message.error }));
  const meta = [];
  if (message.stopped) meta.push(el("span", { class: "stopped", text: "stopped" }));
  if (message.cut) meta.push(el("span", { class: "stopped", text: "cut at the length limit (Max tokens or the context)" }));
  if (message.stats) {
    const s = message.stats;
    if (s.ttft !== undefined) meta.push(`first token ${(s.ttft / 1000).toFixed(2)} s`);
    if (s.tps) meta.push(`${s.tps.toFixed(1)} tokens/s`);
    if (s.tokens) meta.push(`${s.tokens} tokens`);
    if (s.model) meta.push(s.model);
  }
  if (meta.length) {
    const line = el("div", { class: "meta" });
    meta.forEach((part, i) => line.append(i ? " · " : "", part));
    node.append(line);
  }
}

const messageNodes = new WeakMap();  // message -> its <article> (kept out of the saved conversations)
let paintQueued = false;
function paintAnswer(message) {
  if (paintQueued) return;
  paintQueued = true;
  requestAnimationFrame(() => {
    paintQueued = false;
    const box = $("#messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const node = messageNodes.get(message);
    if (node) fillMessage(node, message);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function wireMessage(message) {  // what /api/chat gets of a kept message
  const wire = { role: message.role, content: message.content || "" };
  if (message.images?.length) wire.images = message.images;
  if (message.tool_calls?.length) wire.tool_calls = message.tool_calls;
  if (message.thinking) wire.thinking = message.thinking;
  return wire;
}

async function sendMessage() {
  if (generating) return;
  const conversation = currentConversation();
  readSettings(conversation);
  const text = $("#prompt").value;
  if (!text.trim() && !pendingImages.length) return;
  const model = conversation.model;
  if (!model) {
    toast("Pick a model first (pull one under Models)");
    return;
  }
  const question = { role: "user", content: text, images: pendingImages.length ? pendingImages : undefined };
  const answer = { role: "assistant", content: "", thinking: "", done: false };
  if (conversation.title === "New chat") conversation.title = text.trim().slice(0, 48) || "Image";
  const earlier = conversation.messages.filter((m) => !m.error);
  conversation.messages.push(question, answer);
  $("#prompt").value = "";
  pendingImages = [];
  renderAttachments();
  saveConversations();
  renderConversation();

  const options = {};
  for (const field of OPTION_FIELDS) if (conversation.options[field] !== undefined) options[field] = conversation.options[field];
  const body = { model, stream: true, options, messages: [...earlier, question].map(wireMessage) };
  if (conversation.system.trim()) body.messages.unshift({ role: "system", content: conversation.system });
  if (conversation.options.think) body.think = conversation.options.think === "true";
  if (conversation.options.keep_alive) {
    const keep = conversation.options.keep_alive;
    body.keep_alive = /^-?\d+$/.test(keep) ? Number(keep) : keep;
  }

  const controller = new AbortController();
  generating = { controller, answer };
  setComposerBusy(true);
  const started = performance.now();
  let first = null;
  let chunks = 0;
  try {
    const response = await api("/api/chat", { method: "POST", body, signal: controller.signal });
    for await (const chunk of ndjson(response)) {
      if (chunk.error) {
        answer.error = chunk.error;
        break;
      }
      const message = chunk.message || {};
      if (message.content || message.thinking) {
        if (first === null) first = performance.now();
        chunks += 1;
      }
      answer.content += message.content || "";
      answer.thinking += message.thinking || "";
      if (message.tool_calls) answer.tool_calls = [...(answer.tool_calls || []), ...message.tool_calls];
      if (chunk.done) {
        const seconds = (chunk.eval_duration || 0) / 1e9;
        answer.stats = {
          ttft: first === null ? performance.now() - started : first - started,
          tps: seconds > 0 ? chunk.eval_count / seconds : undefined, tokens: chunk.eval_count, model,
        };
        if (chunk.done_reason === "length") answer.cut = true;
      }
      paintAnswer(answer);
    }
  } catch (error) {
    if (error.name === "AbortError") {
      answer.stopped = true;
    } else {
      answer.error = error.message;
    }
  } finally {
    if (!answer.stats && first !== null) {  // stopped or cut: timed here, a chunk is about a token
      const seconds = (performance.now() - first) / 1000;
      answer.stats = { ttft: first - started, tps: seconds > 0 ? chunks / seconds : undefined, tokens: chunks, model };
    }
    answer.done = true;
    generating = null;
    setComposerBusy(false);
    const node = messageNodes.get(answer);
    if (node) fillMessage(node, answer);
    saveConversations();
    $("#prompt").focus();
  }
}

function stopAnswer() {
  if (generating) generating.controller.abort();
}

function setComposerBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  if (busy) $("#stop").focus();
}

function renderAttachments() {
  $("#attachments").replaceChildren(...pendingImages.map((image, i) => el("div", { class: "attachment" },
    el("img", { src: imageUrl(image), alt: `attached image ${i + 1}` }),
    el("button", {
      type: "button", text: "×", "aria-label": `Remove image ${i + 1}`,
      onclick: () => { pendingImages.splice(i, 1); renderAttachments(); },
    }))));
}

function setUpChat() {
  loadConversations();
  $("#new-chat").addEventListener("click", () => {
    if (generating) stopAnswer();
    if (currentConversation().messages.length) newConversation();
    else $("#prompt").focus();
  });
  $("#composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && generating && !document.querySelector("dialog[open]")) stopAnswer();
  });
  $("#stop").addEventListener("click", stopAnswer);
  $("#chat-model").addEventListener("change", () => {
    const conversation = currentConversation();
    conversation.model = $("#chat-model").value;
    saveConversations();
    showCapabilities();
  });
  $("#chat-settings").addEventListener("change", () => {
    readSettings(currentConversation());
    saveConversations();
  });
  $("#image-input").addEventListener("change", async (event) => {
    for (const file of event.target.files) {
      const url = await new Promise((resolve, reject) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result);
        reader.onerror = () => reject(reader.error);
        reader.readAsDataURL(file);
      });
      pendingImages.push(String(url).split(",")[1]);
    }
    event.target.value = "";
    renderAttachments();
  });
  renderConversation();
}

// ---------------------------------------------------------------------------------------------------------------
// models: the table, details, copy, delete, pulls, suggestions
async function refreshModels() {
  let list;
  try {
    list = await loadModels();
  } catch (error) {
    toast(error.message);
    return;
  }
  const body = $("#models-table tbody");
  $("#models-empty").hidden = list.length > 0;
  body.replaceChildren(...list.map((m) => {
    const details = m.details || {};
    const caps = el("td", { class: "caps-cell" });
    const row = el("tr", { "data-model": m.name },
      el("td", {}, el("span", { class: "name", text: m.name })),
      el("td", { text: formatBytes(m.size) }),
      el("td", { text: details.format || "" }),
      el("td", { text: details.quantization_level || "" }),
      el("td", { text: details.parameter_size || "" }),
      caps,
      el("td", { text: relativeTime(m.modified_at), title: m.modified_at }),
      el("td", { class: "actions" },
        el("button", { type: "button", class: "small", text: "Chat", "aria-label": `Chat with ${m.name}`,
          onclick: () => chatWith(m.name) }),
        el("button", { type: "button", class: "small", text: "Details", "aria-label": `Details of ${m.name}`,
          onclick: () => showDetails(m.name) }),
        el("button", { type: "button", class: "small", text: "Copy", "aria-label": `Copy ${m.name}`,
          onclick: () => copyModel(m.name) }),
        el("button", { type: "button", class: "small danger", text: "Delete", "aria-label": `Delete ${m.name}`,
          onclick: () => deleteModel(m.name) })));
    showModel(m.name).then((info) => {
      caps.replaceChildren(...(info.capabilities || []).map((c) => el("span", { class: "cap", text: c })));
    }).catch(() => {});
    return row;
  }));
}

function chatWith(name) {
  const conversation = currentConversation();
  if (conversation.messages.length) newConversation(false);
  currentConversation().model = name;
  saveConversations();
  showView("chat");
  renderConversation();
  $("#prompt").focus();
}

async function showDetails(name) {
  const panel = $("#model-details");
  panel.hidden = false;
  panel.replaceChildren(el("p", { class: "muted", text: `Reading ${name}…` }));
  try {
    shown.delete(name);
    const info = await showModel(name);
    const details = info.details || {};
    const facts = [
      ["Format", details.format], ["Family", details.family], ["Parameters", details.parameter_size],
      ["Quantization", details.quantization_level], ["Capabilities", (info.capabilities || []).join(", ")],
      ["Context (trained)", Object.entries(info.model_info || {}).find(([k]) => k.endsWith(".context_length"))?.[1]],
      ["Source", info.source ? Object.entries(info.source).map(([k, v]) => `${k}: ${v}`).join(", ") : ""],
      ["Parameters set", info.parameters], ["System prompt", info.system],
    ].filter(([, value]) => value !== undefined && value !== null && value !== "");
    panel.replaceChildren(
      el("h2", { text: name }),
      el("dl", {}, facts.map(([key, value]) => [el("dt", { text: key }), el("dd", { text: String(value) })])),
      el("h3", { text: "Files" }),
      el("ul", {}, (info.files || []).map((f) => el("li", {}, el("span", { class: "mono", text: f.path }),
        ` ${formatBytes(f.size)}`))),
      info.template ? el("details", {}, el("summary", { text: "Chat template" }), el("pre", { text: info.template })) : null,
      el("details", {}, el("summary", { text: "Modelfile" }), el("pre", { text: info.modelfile || "" })),
      el("button", { type: "button", class: "quiet", text: "Close", onclick: () => { panel.hidden = true; } }));
  } catch (error) {
    panel.replaceChildren(el("p", { class: "error", text: error.message }));
  }
}

async function copyModel(name) {
  const destination = await askText(`Copy ${name} as`, `${name.split(":")[0]}-copy`);
  if (!destination) return;
  try {
    await api("/api/copy", { method: "POST", body: { source: name, destination } });
    toast(`Copied ${name} to ${destination}`);
  } catch (error) {
    toast(error.message);
  }
  refreshModels();
}

async function deleteModel(name) {
  if (!await confirmAction(`Delete ${name}? Its files are removed unless another model uses them.`)) return;
  try {
    await api("/api/delete", { method: "DELETE", body: { model: name } });
    shown.delete(name);
    toast(`Deleted ${name}`);
  } catch (error) {
    toast(error.message);
  }
  refreshModels();
}

async function loadSuggestions() {
  try {
    const catalog = await apiJson("/ui/catalog.json");
    const names = catalog.models.map((m) => m.name);
    $("#catalog-names").replaceChildren(...names.map((name) => el("option", { value: name })));
    // the small sizes first: a first pull that finishes in minutes
    const small = ["smollm2:135m", "qwen2.5:0.5b", "qwen3:0.6b", "llama3.2:1b", "gemma3:1b", "qwen2.5:1.5b",
      "deepseek-r1:1.5b", "qwen2.5:7b"].filter((n) => names.includes(n));
    const picks = small.length ? small : names.slice(0, 8);
    $("#suggestions").replaceChildren(el("span", { class: "muted", text: "Suggested:" }),
      ...picks.map((name) => el("button", {
        type: "button", text: name,
        onclick: () => { $("#pull-ref").value = name; $("#pull-ref").focus(); },
      })));
  } catch { /* the pull box works without them */ }
}

function average(row) {  // a finished file's speed over the whole pull
  const seconds = (row.last.time - row.first.time) / 1000;
  return seconds > 0.5 ? ` at ${formatBytes((row.last.completed - row.first.completed) / seconds)}/s` : "";
}

function startPull(reference) {
  const controller = new AbortController();
  const status = el("div", { class: "status", text: "starting…" });
  const files = el("div", { class: "files" });
  const cancel = el("button", { type: "button", class: "small", text: "Cancel", onclick: () => controller.abort() });
  const card = el("section", { class: "pull", "aria-label": `Pull ${reference}` },
    el("header", {}, el("span", { class: "ref", text: reference }), cancel), status, files);
  $("#pulls").prepend(card);
  const rows = new Map();  // digest -> {bar, percent, numbers, last, speed}

  const fileRow = (event) => {
    let row = rows.get(event.digest);
    if (!row) {
      row = {
        bar: el("progress", { max: 1, value: 0, "aria-label": `${event.digest.slice(7, 19)} downloaded` }),
        percent: el("span", { class: "percent", text: "0 %" }), numbers: el("div", { class: "numbers" }),
        last: null, speed: 0,
      };
      files.append(el("div", { class: "file" }, el("span", { class: "mono", text: event.digest.slice(7, 19) }),
        row.bar, row.percent, row.numbers));
      rows.set(event.digest, row);
    }
    return row;
  };

  (async () => {
    try {
      const response = await api("/api/pull", { method: "POST", body: { model: reference, stream: true },
        signal: controller.signal });
      for await (const event of ndjson(response)) {
        if (event.error) throw new ApiError(0, event.error);
        if (event.digest && event.total) {
          const row = fileRow(event);
          const now = performance.now();
          if (row.last && now > row.last.time) {
            const speed = (event.completed - row.last.completed) / ((now - row.last.time) / 1000);
            row.speed = row.speed ? 0.7 * row.speed + 0.3 * speed : speed;
          }
          row.last = { time: now, completed: event.completed };
          row.first ??= { time: now, completed: event.completed };
          const fraction = event.completed / event.total;
          row.bar.value = fraction;
          row.percent.textContent = `${Math.floor(fraction * 100)} %`;
          const eta = row.speed > 0 ? formatSeconds((event.total - event.completed) / row.speed) : "?";
          row.numbers.textContent = `${formatBytes(event.completed)} of ${formatBytes(event.total)}` +
            (fraction < 1 ? ` · ${formatBytes(row.speed)}/s · ${eta} left` : ` · done${average(row)}`);
        } else if (event.status) {
          status.textContent = event.status;
        }
        if (event.status === "success") {
          card.classList.add("done");
          cancel.remove();
          toast(`Pulled ${reference}`);
          if (currentView === "models") refreshModels();
          else loadModels().catch(() => {});
        }
      }
    } catch (error) {
      status.textContent = error.name === "AbortError"
        ? "cancelled: pull it again to resume where it stopped"
        : error.message;
      status.classList.add("error");
      card.classList.add("failed");
      cancel.remove();
    }
  })();
}

function setUpModels() {
  $("#pull-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const reference = $("#pull-ref").value.trim();
    if (!reference) return;
    $("#pull-ref").value = "";
    startPull(reference);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// running: /api/ps, unload, keep-alive; GPU memory and small charts from /metrics
function parseMetrics(text) {  // Prometheus text format -> [{name, labels, value}]
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

const sum = (samples, name) => samples.filter((s) => s.name === name).reduce((total, s) => total + s.value, 0);
const HISTORY = 90;  // samples kept for the charts (3 minutes at one every 2 s)
const chartData = { throughput: [], queued: [], inflight: [] };
let lastTokens = null;

async function sampleMetrics() {
  const response = await api("/metrics");
  const samples = parseMetrics(await response.text());
  const tokens = sum(samples, "mgr_generation_tokens_total");
  const now = performance.now();
  const rate = lastTokens && now > lastTokens.time ? Math.max(0, (tokens - lastTokens.value) / ((now - lastTokens.time) / 1000)) : 0;
  lastTokens = { time: now, value: tokens };
  push(chartData.throughput, rate);
  push(chartData.queued, sum(samples, "mgr_requests_queued"));
  push(chartData.inflight, sum(samples, "mgr_requests_in_flight"));
  if (currentView === "running") {
    drawChart($("#chart-throughput"), [chartData.throughput], ["--chart"]);
    drawChart($("#chart-queue"), [chartData.queued, chartData.inflight], ["--chart2", "--chart"]);
    $("#value-throughput").textContent = rate.toFixed(1);
    $("#value-queue").textContent = String(chartData.queued.at(-1));
    $("#value-inflight").textContent = String(chartData.inflight.at(-1));
    renderGpus(samples);
  }
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

function drawChart(canvas, seriesList, colors) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 360;
  const height = canvas.clientHeight || 90;
  if (canvas.width !== width * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const top = Math.max(1, ...seriesList.flat());
  context.strokeStyle = style.getPropertyValue("--border");
  context.beginPath();
  context.moveTo(0, height - 0.5);
  context.lineTo(width, height - 0.5);
  context.stroke();
  seriesList.forEach((series, index) => {
    context.strokeStyle = style.getPropertyValue(colors[index]).trim() || "#2557d6";
    context.lineWidth = 1.5;
    context.beginPath();
    series.forEach((value, i) => {
      const x = width - (series.length - 1 - i) * (width / (HISTORY - 1));
      const y = height - 2 - (value / top) * (height - 6);
      if (i) context.lineTo(x, y);
      else context.moveTo(x, y);
    });
    context.stroke();
  });
  context.fillStyle = style.getPropertyValue("--muted");
  context.font = "11px system-ui, sans-serif";
  context.fillText(top.toFixed(top < 10 ? 1 : 0), 4, 12);
}

function renderGpus(samples) {
  const gpus = new Map();
  for (const s of samples) {
    if (s.name !== "mgr_gpu_memory_total_bytes" && s.name !== "mgr_gpu_memory_free_bytes") continue;
    const gpu = gpus.get(s.labels.gpu) || { name: s.labels.name, total: 0, free: 0 };
    if (s.name.endsWith("total_bytes")) gpu.total = s.value;
    else gpu.free = s.value;
    gpus.set(s.labels.gpu, gpu);
  }
  const box = $("#gpus");
  if (!gpus.size) {
    box.replaceChildren(el("p", { class: "muted", text: "No GPU found (NVML sees none): models run on the CPU." }));
    return;
  }
  box.replaceChildren(...[...gpus.entries()].map(([index, gpu]) => el("div", { class: "gpu" },
    el("span", { text: `GPU ${index} ${gpu.name}` }),
    el("progress", { max: gpu.total || 1, value: gpu.total - gpu.free, "aria-label": `GPU ${index} memory used` }),
    el("span", { text: `${formatBytes(gpu.total - gpu.free)} of ${formatBytes(gpu.total)}` }))));
}

function until(entry) {
  if (entry.active > 0) return "in use";
  const year = Number((entry.expires_at || "").slice(0, 4));
  if (year > 2200) return "forever";
  return relativeTime(entry.expires_at);
}

async function refreshRunning() {
  let entries;
  try {
    entries = (await apiJson("/api/ps")).models || [];
  } catch (error) {
    toast(error.message);
    return;
  }
  $("#running-empty").hidden = entries.length > 0;
  // rows are kept and their cells rewritten, so a poll never resets a control being used
  const body = $("#running-table tbody");
  const names = new Set(entries.map((entry) => entry.name));
  for (const row of [...body.rows]) if (!names.has(row.dataset.model)) row.remove();
  for (const entry of entries) {
    let row = [...body.rows].find((r) => r.dataset.model === entry.name);
    if (!row) {
      row = runningRow(entry.name);
      body.append(row);
    }
    const cells = [entry.name, entry.backend || "", entry.state || "", entry.gpus?.length ? entry.gpus.join(", ") : "CPU",
      entry.size_vram ? `${formatBytes(entry.size_vram)} GPU of ${formatBytes(entry.size)}` : formatBytes(entry.size),
      `${entry.active ?? 0} / ${entry.num_parallel ?? "?"}`, String(entry.queued ?? 0),
      entry.context_length ? String(entry.context_length) : "", until(entry)];
    cells.forEach((text, i) => {
      if (row.cells[i].textContent !== text) row.cells[i].textContent = text;
    });
    row.cells[2].className = `state-${entry.state}`;
    row.cells[8].title = entry.expires_at || "";
  }
}

function runningRow(name) {
  const keep = el("select", { "aria-label": `Keep ${name} loaded for` },
    [["5m", "5 minutes"], ["30m", "30 minutes"], ["1h", "1 hour"], ["4h", "4 hours"], ["-1", "forever"]]
      .map(([value, label]) => el("option", { value, text: label })));
  return el("tr", { "data-model": name }, Array.from({ length: 9 }, (_, i) => el("td", { class: i ? "" : "name" })),
    el("td", { class: "actions" }, keep,
      el("button", { type: "button", class: "small", text: "Keep", "aria-label": `Keep ${name} loaded`,
        onclick: () => keepAlive(name, keep.value) }),
      el("button", { type: "button", class: "small", text: "Logs", "aria-label": `Logs of ${name}`,
        onclick: () => { $("#logs-model").value = name; showView("logs"); } }),
      el("button", { type: "button", class: "small danger", text: "Unload", "aria-label": `Unload ${name}`,
        onclick: () => unload(name) })));
}

async function keepAlive(name, value) {
  try {
    await api("/api/generate", { method: "POST", body: { model: name, keep_alive: value === "-1" ? -1 : value } });
    toast(`${name} stays loaded ${value === "-1" ? "until it is unloaded" : `for ${value} after its last request`}`);
  } catch (error) {
    toast(error.message);
  }
  refreshRunning();
}

async function unload(name) {
  try {
    await api("/api/generate", { method: "POST", body: { model: name, keep_alive: 0 } });
    toast(`Unloaded ${name}`);
  } catch (error) {
    toast(error.message);
  }
  refreshRunning();
}

// ---------------------------------------------------------------------------------------------------------------
// logs: a runner's log, tailed live
let logsController = null;

function stopLogs() {
  if (logsController) logsController.abort();
  logsController = null;
}

async function showLogs() {
  stopLogs();
  if (!models.length) await loadModels().catch(() => {});
  const name = $("#logs-model").value;
  const output = $("#logs-output");
  output.textContent = "";
  if (!name) {
    output.textContent = "No models yet.";
    return;
  }
  const controller = new AbortController();
  logsController = controller;
  const follow = $("#logs-follow").checked;
  try {
    const response = await api(`/api/logs?model=${encodeURIComponent(name)}&lines=500&follow=${follow}`,
      { signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
      output.append(decoder.decode(value, { stream: true }));
      if (output.textContent.length > 400000) output.textContent = output.textContent.slice(-300000);
      if (atBottom) output.scrollTop = output.scrollHeight;
    }
  } catch (error) {
    if (error.name !== "AbortError") output.textContent = error.message;
  }
}

function setUpLogs() {
  $("#logs-model").addEventListener("change", showLogs);
  $("#logs-follow").addEventListener("change", showLogs);
  $("#logs-reload").addEventListener("click", showLogs);
}

// ---------------------------------------------------------------------------------------------------------------
async function refreshEverything() {
  try {
    const version = await apiJson("/api/version");
    $("#daemon-status").textContent = `mgr ${version.mgr_version || ""}`;
    $("#daemon-status").classList.remove("error");
  } catch (error) {
    $("#daemon-status").textContent = error.status === 401 ? "needs an API key" : `not answering: ${error.message}`;
    $("#daemon-status").classList.add("error");
    return;
  }
  await loadModels().catch(() => {});
  loadSuggestions();
  showView(currentView);
}

let polling = false;
async function poll() {  // every 2 s while the page is shown: the charts' samples, and the Running table
  if (polling || document.hidden || $("#key-dialog").open) return;
  polling = true;
  try {
    await sampleMetrics();
    if (currentView === "running") await refreshRunning();
  } catch { /* the status line and the dialog say what is wrong */ } finally {
    polling = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (localStorage.getItem(KEY_STORAGE)) $("#key-button").hidden = false;
  setUpKeyDialog();
  setUpTabs();
  setUpChat();
  setUpModels();
  setUpLogs();
  currentView = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "chat";
  showView(currentView, false, false);  // refreshEverything fills it once the daemon has answered
  refreshEverything();
  setInterval(poll, 2000);
});
