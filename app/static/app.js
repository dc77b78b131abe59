// The agent-bff demo page: chat with an application on the built-in demo agent through the
// gateway (`demo`, or the one the gateway names in <html data-application>).
// POST /apps/<application>/agent/chat answers an SSE stream (event: token | done | error), read here with
// fetch() + ReadableStream so tokens render as they arrive. No inline script (strict CSP).
"use strict";

(() => {
  const APPLICATION = document.documentElement.dataset.application || "demo";
  const AGENT_URL = `/apps/${encodeURIComponent(APPLICATION)}/agent/chat`;
  const SESSION_URL = `/apps/${encodeURIComponent(APPLICATION)}/session`;
  document.getElementById("application").textContent = APPLICATION;
  document.getElementById("agent-url").textContent = `POST ${AGENT_URL}`;
  // Every state-changing call under /apps/ carries this header (the gateway's CSRF defence).
  const CSRF_HEADERS = { "X-CSRF": "1" };

  const form = document.getElementById("composer");
  const input = document.getElementById("message");
  const sendButton = document.getElementById("send");
  const resetButton = document.getElementById("reset");
  const transcript = document.getElementById("transcript");
  const status = document.getElementById("status");

  function addMessage(kind, text) {
    const item = document.createElement("li");
    item.className = `msg ${kind}`;
    item.textContent = text;
    transcript.append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    resetButton.disabled = busy;
    input.disabled = busy;
  }

  // A minimal EventSource-compatible parser (WHATWG HTML "event stream interpretation"):
  // lines end in CRLF, LF or CR; "event:" sets the type, "data:" lines join with "\n", a blank
  // line dispatches, lines starting with ":" (keep-alive comments) are ignored.
  class SseParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buffer = "";
      this.type = "";
      this.data = [];
    }

    push(text) {
      this.buffer += text;
      const lineEnd = /\r\n|\r|\n/;
      for (;;) {
        const match = lineEnd.exec(this.buffer);
        if (match === null) return;
        // A trailing CR may be the first half of a CRLF split across chunks: wait for more.
        if (match[0] === "\r" && match.index === this.buffer.length - 1) return;
        const line = this.buffer.slice(0, match.index);
        this.buffer = this.buffer.slice(match.index + match[0].length);
        this.line(line);
      }
    }

    line(line) {
      if (line === "") {
        if (this.data.length > 0) this.onEvent(this.type || "message", this.data.join("\n"));
        this.type = "";
        this.data = [];
        return;
      }
      if (line.startsWith(":")) return;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.type = value;
      else if (field === "data") this.data.push(value);
    }
  }

  async function describeHttpError(response) {
    try {
      const body = await response.json();
      if (body && body.error) {
        const id = body.error.request_id ? ` (request ${body.error.request_id})` : "";
        return `${response.status} ${body.error.code}: ${body.error.message}${id}`;
      }
    } catch (_) {
      // not our JSON envelope: fall through
    }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  const PENDING_RUN = `agent-bff:${APPLICATION}:run`;
  const RUNS_URL = `/apps/${encodeURIComponent(APPLICATION)}/runs/`;
  // Set when the page goes away: its EventSource is closed then, which is no failed run.
  let leaving = false;
  for (const type of ["beforeunload", "pagehide"]) {
    window.addEventListener(type, () => {
      leaving = true;
    });
  }

  // Follow a run with EventSource until its `done` (resolves) or an `event: error` from the
  // gateway (rejects). Connection drops are EventSource's business: it reconnects with
  // Last-Event-ID and the gateway sends only what came after, so no token is lost or doubled.
  function followRun(runId, reply) {
    reply.dataset.state = "streaming";
    reply.dataset.run = runId;
    reply.dataset.reconnects = "0";
    let tokens = Number(reply.dataset.tokens || "0");
    return new Promise((resolve, reject) => {
      const source = new EventSource(RUNS_URL + encodeURIComponent(runId));
      const finish = (error) => {
        source.close();
        if (leaving) return; // a reload or navigation: the next page resumes the run
        sessionStorage.removeItem(PENDING_RUN);
        if (error) {
          reply.dataset.state = "failed";
          addMessage("error", `Error: ${error}`);
          status.textContent = "The reply failed.";
          resolve();
        } else {
          reply.dataset.state = "done";
          status.textContent = `Done: ${tokens} token${tokens === 1 ? "" : "s"}.`;
          resolve();
        }
      };
      source.addEventListener("open", () => {
        status.textContent = `Streaming… ${tokens} token${tokens === 1 ? "" : "s"}`;
      });
      source.addEventListener("token", (event) => {
        reply.textContent += JSON.parse(event.data).text;
        tokens += 1;
        reply.dataset.tokens = String(tokens);
        reply.dataset.lastEventId = event.lastEventId;
        status.textContent = `Streaming… ${tokens} token${tokens === 1 ? "" : "s"}`;
      });
      source.addEventListener("done", () => finish(null));
      source.addEventListener("error", (event) => {
        if (typeof event.data === "string") {
          // The gateway's (or the agent's) `event: error`: the run ended badly.
          let detail = {};
          try {
            detail = JSON.parse(event.data);
          } catch (_) {
            detail = { message: event.data };
          }
          finish(`${detail.code || "error"}: ${detail.message || "the stream failed"}`);
        } else if (source.readyState === EventSource.CLOSED) {
          finish("the run is no longer available");
        } else {
          reply.dataset.reconnects = String(Number(reply.dataset.reconnects) + 1);
          status.textContent = "Connection lost; resuming…";
        }
      });
    });
  }

  // After a reload: an answer that was still streaming is picked up again, from its start.
  async function resumePending() {
    const saved = sessionStorage.getItem(PENDING_RUN);
    if (!saved) return;
    let pending;
    try {
      pending = JSON.parse(saved);
    } catch (_) {
      sessionStorage.removeItem(PENDING_RUN);
      return;
    }
    addMessage("user", pending.message);
    const reply = addMessage("agent", "");
    reply.dataset.tokens = "0";
    reply.dataset.resumed = "1";
    setBusy(true);
    try {
      await followRun(pending.runId, reply);
    } finally {
      setBusy(false);
    }
  }

  async function sendMessage(text) {
    addMessage("user", text);
    const reply = addMessage("agent", "");
    reply.dataset.state = "waiting";
    reply.dataset.tokens = "0";
    status.textContent = "Waiting for the agent…";
    let tokens = 0;
    let done = false;
    let streamError = null;
    try {
      const response = await fetch(AGENT_URL, {
        method: "POST",
        credentials: "same-origin",
        cache: "no-store",
        headers: {
          ...CSRF_HEADERS,
          "Content-Type": "application/json",
          Accept: "text/event-stream",
        },
        body: JSON.stringify({ message: text }),
      });
      if (!response.ok) throw new Error(await describeHttpError(response));
      const type = response.headers.get("Content-Type") || "";
      if (!type.startsWith("text/event-stream")) throw new Error(`unexpected response type ${type}`);

      const runId = response.headers.get("X-Run-Id");
      if (runId) {
        // A resumable run: the gateway keeps it going without us. Read it with EventSource,
        // which reconnects by itself (sending Last-Event-ID) when the connection drops; a
        // reload picks it up again from sessionStorage.
        response.body.cancel().catch(() => {});
        sessionStorage.setItem(PENDING_RUN, JSON.stringify({ runId, message: text }));
        await followRun(runId, reply);
        return;
      }
      reply.dataset.state = "streaming";
      const parser = new SseParser((event, data) => {
        if (event === "token") {
          reply.textContent += JSON.parse(data).text;
          tokens += 1;
          reply.dataset.tokens = String(tokens);
          status.textContent = `Streaming… ${tokens} token${tokens === 1 ? "" : "s"}`;
        } else if (event === "done") {
          done = true;
        } else if (event === "error") {
          let detail = {};
          try {
            detail = JSON.parse(data);
          } catch (_) {
            detail = { message: data };
          }
          streamError = `${detail.code || "error"}: ${detail.message || "the stream failed"}`;
        }
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        parser.push(value);
        if (done || streamError) break;
      }
      if (streamError) throw new Error(streamError);
      if (!done) throw new Error("the stream ended before the agent finished");
      reply.dataset.state = "done";
      status.textContent = `Done: ${tokens} token${tokens === 1 ? "" : "s"}.`;
    } catch (err) {
      reply.dataset.state = "failed";
      const message = err instanceof TypeError ? `connection lost (${err.message})` : err.message;
      addMessage("error", `Error: ${message}`);
      status.textContent = "The reply failed.";
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    setBusy(true);
    try {
      await sendMessage(text);
    } finally {
      setBusy(false);
      input.focus();
    }
  });

  resetButton.addEventListener("click", async () => {
    setBusy(true);
    try {
      const response = await fetch(SESSION_URL, {
        method: "DELETE",
        credentials: "same-origin",
        headers: CSRF_HEADERS,
      });
      if (!response.ok) throw new Error(await describeHttpError(response));
      transcript.replaceChildren();
      status.textContent = "New conversation: the gateway ended the session.";
    } catch (err) {
      addMessage("error", `Error: ${err.message}`);
    } finally {
      setBusy(false);
      input.focus();
    }
  });

  input.focus();
  resumePending();
})();
