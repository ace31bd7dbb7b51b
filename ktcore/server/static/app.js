// ktcore web chat: conversations are Assistants API threads; replies stream from a run (SSE). A server
// without the Assistants API (kt serve --no-assistants) gets /v1/chat/completions over a conversation kept
// in the page. What the server offers (Assistants, a chat template, the context size) comes from /health.
"use strict";

const $ = (id) => document.getElementById(id);
const WEB_ASSISTANT_TAG = "ktcore-web";
const state = {
  model: null, assistantId: null, threadId: null, abort: null, runId: null,
  assistants: true, contextLength: 0, history: [],  // history: the page's own conversation without Assistants
};

function apiKey() { return localStorage.getItem("ktcore-api-key") || ""; }

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it in the sidebar");
  }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* keep statusText */ }
    throw new Error(message);
  }
  return response;
}
const getJSON = async (path) => (await api(path)).json();
const postJSON = async (path, body) => (await api(path, { method: "POST", body: JSON.stringify(body) })).json();

function setStatus(text) { $("status").textContent = text || ""; }

// Sampling settings from the sidebar: {temperature, maxTokens}, or throws naming the bad field.
function settings() {
  const temperature = Number($("temperature").value);
  const maxTokens = Number($("max-tokens").value);
  if ($("temperature").value === "" || !(temperature >= 0 && temperature <= 2)) throw new Error("temperature must be between 0 and 2");
  if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new Error("max tokens must be a whole number of at least 1");
  return { temperature, maxTokens };
}

// Says under a finished reply why it stopped when a limit, not the model, ended it.
function noteStop(bubble, usage, hitLength, maxTokens) {
  let text = null;
  if (usage && state.contextLength && usage.prompt_tokens + usage.completion_tokens >= state.contextLength) {
    text = `Stopped at the context limit (${state.contextLength} tokens): start a new chat to go on.`;
  } else if (hitLength) {
    text = `Stopped at the max-tokens limit (${maxTokens}).`;
  }
  if (!text) return;
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  bubble.after(note);
  bubble.dataset.stopped = text.includes("context") ? "context" : "max-tokens";
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function ensureAssistant() {
  if (state.assistantId) return state.assistantId;
  const list = await getJSON("/v1/assistants?limit=100");
  const mine = list.data.find((a) => a.metadata && a.metadata.app === WEB_ASSISTANT_TAG && a.model === state.model);
  const assistant = mine || await postJSON("/v1/assistants", {
    model: state.model, name: "Web chat", metadata: { app: WEB_ASSISTANT_TAG },
    instructions: "You are a helpful assistant.",
  });
  state.assistantId = assistant.id;
  return assistant.id;
}

async function loadThreads() {
  const list = await getJSON("/v1/threads?limit=100");
  const ul = $("threads");
  ul.innerHTML = "";
  for (const thread of list.data) {
    if (!thread.metadata || thread.metadata.app !== WEB_ASSISTANT_TAG) continue;
    const li = document.createElement("li");
    li.textContent = thread.metadata.title || thread.id;
    li.dataset.id = thread.id;
    li.classList.toggle("active", thread.id === state.threadId);
    li.onclick = () => openThread(thread.id);
    ul.appendChild(li);
  }
}

async function openThread(id) {
  if (state.abort) return;
  state.threadId = id;
  $("messages").innerHTML = "";
  const list = await getJSON(`/v1/threads/${id}/messages?order=asc&limit=100`);
  for (const m of list.data) addBubble(m.role, m.content.map((c) => c.text.value).join(""));
  await loadThreads();
}

function newChat() {
  if (state.abort) return;
  state.threadId = null;
  state.history = [];
  $("messages").innerHTML = "";
  if (state.assistants) loadThreads();
  $("prompt").focus();
}

function setBusy(busy) {
  $("send").disabled = busy || $("prompt").disabled;
  $("stop").hidden = !busy;
}

// Reads an SSE body, calling onEvent(name, data) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && data !== "[DONE]") onEvent(name, JSON.parse(data));
    }
  }
}

async function send(text) {
  setStatus("");
  const { temperature, maxTokens } = settings();
  if (!state.assistants) return sendDirect(text, temperature, maxTokens);
  const assistantId = await ensureAssistant();
  if (!state.threadId) {
    const thread = await postJSON("/v1/threads", { metadata: { app: WEB_ASSISTANT_TAG, title: text.slice(0, 60) } });
    state.threadId = thread.id;
    loadThreads();
  }
  const threadId = state.threadId;
  await postJSON(`/v1/threads/${threadId}/messages`, { role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  state.abort = new AbortController();
  setBusy(true);
  try {
    const response = await api(`/v1/threads/${threadId}/runs`, {
      method: "POST", signal: state.abort.signal,
      body: JSON.stringify({ assistant_id: assistantId, stream: true, temperature, max_completion_tokens: maxTokens }),
    });
    await readEvents(response, (name, data) => {
      if (name === "thread.run.created") state.runId = data.id;
      else if (name === "thread.message.delta") {
        for (const part of data.delta.content || []) bubble.textContent += part.text ? part.text.value : "";
        $("messages").scrollTop = $("messages").scrollHeight;
      } else if (name === "thread.run.completed" || name === "thread.run.incomplete") {
        noteStop(bubble, data.usage, name === "thread.run.incomplete", maxTokens);
      } else if (name === "thread.run.failed") setStatus("run failed: " + (data.last_error || {}).message);
      else if (name === "error") setStatus(data.error ? data.error.message : "error");
    });
  } catch (err) {
    if (err.name !== "AbortError") setStatus(err.message);
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "1";
    state.abort = null;
    state.runId = null;
    setBusy(false);
  }
}

// Without the Assistants API: the conversation lives in the page and goes to /v1/chat/completions whole.
async function sendDirect(text, temperature, maxTokens) {
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  state.abort = new AbortController();
  setBusy(true);
  const messages = [...state.history, { role: "user", content: text }];
  let finish = null, usage = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: state.abort.signal,
      body: JSON.stringify({ model: state.model, messages, stream: true, stream_options: { include_usage: true },
                             temperature, max_tokens: maxTokens }),
    });
    await readEvents(response, (name, data) => {
      if (data.error) { setStatus(data.error.message || "error"); return; }
      if (data.usage) usage = data.usage;
      for (const choice of data.choices || []) {
        if (choice.delta && choice.delta.content) bubble.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("messages").scrollTop = $("messages").scrollHeight;
    });
    noteStop(bubble, usage, finish === "length", maxTokens);
  } catch (err) {
    if (err.name !== "AbortError") setStatus(err.message);
  } finally {
    if (bubble.textContent) state.history = [...messages, { role: "assistant", content: bubble.textContent }];
    bubble.classList.remove("streaming");
    bubble.dataset.done = "1";
    state.abort = null;
    setBusy(false);
  }
}

async function stop() {
  const { runId, threadId, abort } = state;
  if (runId) { try { await postJSON(`/v1/threads/${threadId}/runs/${runId}/cancel`, {}); } catch (_) { /* already over */ } }
  if (abort) abort.abort();
}

function restoreSettings() {
  for (const id of ["temperature", "max-tokens"]) {
    const saved = localStorage.getItem("ktcore-" + id);
    if (saved !== null) $(id).value = saved;
    $(id).onchange = () => localStorage.setItem("ktcore-" + id, $(id).value);
  }
}

// A model without a chat template cannot chat: say so and take the composer away.
function refuseChat() {
  setStatus("This model has no chat template, so this page cannot chat with it; send plain text to /v1/completions (or use kt run --raw).");
  $("prompt").disabled = true;
  $("send").disabled = true;
}

async function init() {
  $("api-key").value = apiKey();
  restoreSettings();
  $("save-key").onclick = () => { localStorage.setItem("ktcore-api-key", $("api-key").value.trim()); location.reload(); };
  $("new-chat").onclick = newChat;
  $("stop").onclick = stop;
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.abort) return;
    $("prompt").value = "";
    send(text).catch((err) => setStatus(err.message));
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  };
  try {
    const health = await getJSON("/health");
    state.assistants = health.assistants !== false;
    state.contextLength = health.context_length || 0;
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = state.model;
    if (health.chat_template === false) refuseChat();
    if (state.assistants) await loadThreads();
    else $("threads-off").hidden = false;
  } catch (err) {
    setStatus(err.message);
  }
}

init();
