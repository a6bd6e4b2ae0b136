// The feedback page of `tunelab serve`: ask the served model, rate its answer, write a critique or a
// corrected answer, and post it to /v1/feedback, which stores it in the feedback store. Plain JavaScript, no
// build step; model text is only ever set with textContent (never parsed as HTML).
"use strict";

// What the page can ask, by the engine's capability: label, the record's task, the question box's label.
const MODES = {
  "chat": {label: "Chat", task: "chat", question: "Your message"},
  "completions": {label: "Complete a text", task: "completion", question: "Text to continue"},
  "classify": {label: "Classify a text", task: "classification", question: "Text to classify"},
  "tag": {label: "Tag the words of a sentence", task: "tagging", question: "Sentence to tag"},
  "answer": {label: "Answer a question from a text", task: "qa", question: "Question"},
  "fill-mask": {label: "Fill in the mask", task: "fill-mask", question: "Text with the mask token"},
  "seq2seq": {label: "Translate or summarize", task: "seq2seq", question: "Text to translate or summarize"},
};
const CORRECTION_HINTS = {
  "classification": "Optional: the right label.",
  "tagging": "Optional: the right tags, one per word, separated by spaces.",
  "fill-mask": "Optional: the right word for the mask.",
};
const KEY_STORAGE = "tunelab-api-key";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,      // the served model's name
  mode: null,       // a key of MODES
  messages: [],     // the chat so far: {role, content}
  pending: null,    // the answer to judge: {input, output, task, metadata}
  verdict: null,    // "good" | "bad" | null
  busy: false,
};

// ------------------------------------------------------------------------------------------------ requests

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class RequestError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    throw new RequestError(0, "The server does not answer (" + err.message + ").");
  }
  let data = null;
  try { data = await response.json(); } catch (err) { /* not JSON */ }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : response.status + " " + response.statusText;
    throw new RequestError(response.status, message);
  }
  return data;
}

function showError(err) {
  const box = $("error");
  box.textContent = err.message;
  box.hidden = false;
  if (err.status === 401) {
    box.textContent = err.message + ". Type the server's API key in Settings.";
    $("settings").open = true;
    $("api-key").focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ------------------------------------------------------------------------------------------------ modes

function setMode(mode) {
  state.mode = mode;
  const spec = MODES[mode];
  $("question-label").textContent = spec.question;
  for (const element of document.querySelectorAll("[data-modes]")) {
    element.hidden = !element.dataset.modes.split(" ").includes(mode);
  }
  $("correction-hint").textContent = CORRECTION_HINTS[spec.task] ||
    "Optional: the answer it should have given (a correction makes the verdict Bad).";
  state.messages = [];
  renderConversation();
}

function buildModes(capabilities) {
  const modes = Object.keys(MODES).filter((m) => capabilities.includes(m));
  const box = $("modes");
  box.replaceChildren();
  for (const mode of modes) {
    const id = "mode-" + mode;
    const input = Object.assign(document.createElement("input"), {type: "radio", name: "mode", id, value: mode});
    input.addEventListener("change", () => { if (input.checked) setMode(mode); });
    const label = Object.assign(document.createElement("label"), {htmlFor: id, textContent: MODES[mode].label});
    const item = document.createElement("span");
    item.className = "mode";
    item.append(input, label);
    box.append(item);
  }
  $("mode-field").hidden = modes.length < 2;
  if (modes.length) {
    box.querySelector("input").checked = true;
    setMode(modes[0]);
  }
  return modes;
}

// ------------------------------------------------------------------------------------------------ asking

function numberField(id, fallback) {
  const value = Number($(id).value);
  return $(id).value.trim() === "" || !Number.isFinite(value) ? fallback : value;
}

// Ask the model in the current mode; returns what to judge: {input, output, task, metadata, shown}.
async function ask(question) {
  const mode = state.mode;
  const task = MODES[mode].task;
  const maxTokens = Math.max(1, Math.round(numberField("max-tokens", 256)));
  const temperature = numberField("temperature", 0);
  if (mode === "chat") {
    const system = $("system").value.trim();
    const messages = [...(system ? [{role: "system", content: system}] : []), ...state.messages,
                      {role: "user", content: question}];
    const data = await api("POST", "/v1/chat/completions", {messages, max_tokens: maxTokens, temperature});
    const choice = data.choices[0];
    return {input: messages, output: choice.message.content, task, shown: choice.message.content,
            metadata: {finish_reason: choice.finish_reason, max_tokens: maxTokens, temperature, request_id: data.id}};
  }
  if (mode === "completions") {
    const data = await api("POST", "/v1/completions", {prompt: question, max_tokens: maxTokens, temperature});
    const choice = data.choices[0];
    return {input: question, output: choice.text, task, shown: question + choice.text,
            metadata: {finish_reason: choice.finish_reason, max_tokens: maxTokens, temperature, request_id: data.id}};
  }
  if (mode === "classify") {
    const result = (await api("POST", "/v1/classify", {input: question})).data[0];
    const others = Object.entries(result.scores).sort((a, b) => b[1] - a[1])
      .map(([label, score]) => label + " " + score.toFixed(3)).join(", ");
    return {input: question, output: result.label, task, metadata: {scores: result.scores},
            shown: result.label + " (score " + result.score.toFixed(3) + "; all: " + others + ")"};
  }
  if (mode === "tag") {
    const result = (await api("POST", "/v1/tag", {input: question})).data[0];
    const entities = result.entities.map((e) => e.text + " (" + e.type + ")").join(", ") || "none";
    return {input: question, output: result.tags.join(" "), task, metadata: {tokens: result.tokens},
            shown: result.tokens.map((w, i) => w + "/" + result.tags[i]).join(" ") + "\nEntities: " + entities};
  }
  if (mode === "answer") {
    const context = $("context").value;
    if (!context.trim()) throw new RequestError(400, "Type the context the answer is in.");
    const data = await api("POST", "/v1/answer", {question, context});
    return {input: question, output: data.answer, task, metadata: {context, start: data.start},
            shown: data.answer || "(no answer in the context)"};
  }
  if (mode === "fill-mask") {
    const data = (await api("POST", "/v1/fill-mask", {input: question, top_k: 5})).data;
    const best = data.map((predictions) => predictions[0].token.trim());
    const lines = data.map((predictions, i) => "mask " + (i + 1) + ": " +
      predictions.map((p) => p.token.trim() + " " + p.probability.toFixed(3)).join(", "));
    return {input: question, output: best.join(" "), task, metadata: {predictions: data},
            shown: (data.length === 1 ? data[0][0].sequence : best.join(" ")) + "\n" + lines.join("\n")};
  }
  if (mode === "seq2seq") {
    const text = (await api("POST", "/v1/translate", {input: question, max_tokens: maxTokens})).data[0].text;
    return {input: question, output: text, task, metadata: {max_tokens: maxTokens}, shown: text};
  }
  throw new RequestError(400, "This model has nothing the page can ask.");
}

function renderConversation() {
  const list = $("conversation");
  list.replaceChildren();
  // the latest answer is in the Answer box: the list shows the turns before it
  const last = state.messages[state.messages.length - 1];
  const shown = last && last.role === "assistant" ? state.messages.slice(0, -1) : state.messages;
  for (const message of shown) {
    const item = document.createElement("li");
    item.className = "turn " + message.role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = message.role === "user" ? "You: " : "Model: ";
    item.append(who, document.createTextNode(message.content));
    list.append(item);
  }
  list.hidden = shown.length === 0;
}

async function onAsk(event) {
  event.preventDefault();
  if (state.busy) return;
  const question = $("question").value;
  if (!question.trim()) {
    showError({message: "Type a question first."});
    $("question").focus();
    return;
  }
  clearError();
  state.busy = true;
  $("send").disabled = true;
  const answer = $("answer");
  const before = answer.textContent;
  answer.setAttribute("aria-busy", "true");
  answer.textContent = "The model is answering…";
  try {
    const result = await ask(question);
    state.pending = result;
    if (state.mode === "chat") {
      state.messages.push({role: "user", content: question}, {role: "assistant", content: result.output});
      renderConversation();
      $("question").value = "";
    }
    answer.textContent = result.shown === "" ? "(an empty answer)" : result.shown;
    resetFeedback(true);
    $("status").textContent = "";
  } catch (err) {
    answer.textContent = before;  // the answer still to judge, if any
    showError(err);
  } finally {
    answer.removeAttribute("aria-busy");
    state.busy = false;
    $("send").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ feedback

function setVerdict(verdict) {
  state.verdict = state.verdict === verdict ? null : verdict;  // pressing it again takes it back
  $("good").setAttribute("aria-pressed", String(state.verdict === "good"));
  $("bad").setAttribute("aria-pressed", String(state.verdict === "bad"));
}

function resetFeedback(enabled) {
  state.verdict = null;
  setVerdict(null);
  $("critique").value = "";
  $("correction").value = "";
  for (const id of ["good", "bad", "critique", "correction", "submit"]) $(id).disabled = !enabled;
}

async function onFeedback(event) {
  event.preventDefault();
  if (!state.pending || state.busy) return;
  const critique = $("critique").value.trim();
  const correction = $("correction").value.trim();
  let verdict = state.verdict;
  if (!verdict && !correction) {
    showError({message: "Rate the answer first: Good or Bad (or write the corrected answer)."});
    $("good").focus();
    return;
  }
  if (correction && verdict === "good") {
    showError({message: "A corrected answer means the answer was not right: choose Bad, or clear the correction."});
    $("bad").focus();
    return;
  }
  if (correction) verdict = "bad";
  clearError();
  state.busy = true;
  $("submit").disabled = true;
  const body = {input: state.pending.input, output: state.pending.output, task: state.pending.task, verdict,
                critique: critique || null, correction: correction || null,
                metadata: {...state.pending.metadata, via: "feedback page"}};
  try {
    const record = await api("POST", "/v1/feedback", body);
    resetFeedback(false);
    state.pending = null;
    $("status").textContent = "Saved: record " + record.id + ", verdict " + record.verdict +
      (record.critique ? ", with a critique" : "") + (record.correction ? ", with a correction" : "") +
      ". Ask the next question.";
    $("question").focus();
    loadSaved();
  } catch (err) {
    $("submit").disabled = false;
    showError(err);
  } finally {
    state.busy = false;
  }
}

async function loadSaved() {
  try {
    const data = await api("GET", "/v1/feedback?limit=5");
    $("saved-info").textContent = data.total + " record" + (data.total === 1 ? "" : "s") + " of " + state.model +
      " in " + data.store + (data.total ? "; the latest:" : ".");
    const list = $("saved");
    list.replaceChildren();
    for (const record of data.data) {
      const item = document.createElement("li");
      const input = typeof record.input === "string" ? record.input
        : record.input.filter((m) => m.role === "user").map((m) => m.content).pop() || "";
      let text = "#" + record.id + " " + (record.verdict || "score " + record.score) + ": " + short(input) +
        " → " + short(record.output);
      if (record.correction) text += " (correction: " + short(record.correction) + ")";
      item.textContent = text;
      list.append(item);
    }
  } catch (err) {
    $("saved-info").textContent = err.status === 404 ? "This server keeps no feedback (started with --no-feedback)."
      : err.status === 401 ? "Type the API key in Settings to see saved feedback." : err.message;
  }
}

function short(text) {
  const flat = String(text).replace(/\s+/g, " ").trim();
  return flat.length > 80 ? flat.slice(0, 79) + "…" : flat;
}

// ------------------------------------------------------------------------------------------------ start

function keyboard() {
  // Enter sends the question (Shift+Enter: a new line); in the context box Enter is a new line.
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  // Ctrl+Enter (Cmd+Enter) in the critique or correction submits the feedback.
  for (const id of ["critique", "correction"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $("feedback-form").requestSubmit();
      }
    });
  }
}

async function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value));
  $("api-key").addEventListener("change", loadSaved);
  $("ask-form").addEventListener("submit", onAsk);
  $("feedback-form").addEventListener("submit", onFeedback);
  $("good").addEventListener("click", () => setVerdict("good"));
  $("bad").addEventListener("click", () => setVerdict("bad"));
  $("new-conversation").addEventListener("click", () => {
    state.messages = [];
    renderConversation();
    $("question").focus();
  });
  keyboard();
  try {
    const health = await api("GET", "/health");
    state.model = health.model;
    $("model-name").textContent = health.model;
    document.title = "tunelab: feedback on " + health.model;
    const modes = buildModes(health.capabilities);
    $("model-info").textContent = modes.length
      ? "It can: " + modes.map((m) => MODES[m].label.toLowerCase()).join("; ") + "."
      : "This model has no endpoint the page can ask (capabilities: " + (health.capabilities.join(", ") || "none") + ").";
    $("send").disabled = modes.length === 0;
  } catch (err) {
    $("model-info").textContent = "";
    showError(err);
  }
  document.body.dataset.ready = "true";
  loadSaved();
}

document.addEventListener("DOMContentLoaded", start);
