import DOMPurify from "dompurify";
import { useEffect, useMemo, useState } from "react";

import { describeError, Message } from "../api";
import { ConfirmButton } from "../components/Confirm";
import { useTracker } from "../tracker";
import { when } from "./Accounts";

// The message's HTML is sanitised, then shown in a frame with every sandbox restriction
// (no scripts, no forms, no same origin) and a policy that loads nothing from outside.
const FRAME_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:";

// Remote images are tracking pixels as often as not: dropped, with a note in their place.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "IMG" && !/^data:/i.test(node.getAttribute("src") ?? "")) {
    node.removeAttribute("src");
    node.removeAttribute("srcset");
    node.setAttribute("alt", "[remote image not loaded]");
  }
});

export function sanitizedDocument(html: string): string {
  const clean = DOMPurify.sanitize(html, { WHOLE_DOCUMENT: false, FORBID_TAGS: ["style", "form"], FORBID_ATTR: ["style"] });
  return `<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="${FRAME_POLICY}"><base target="_blank"></head><body>${clean}</body></html>`;
}

function SpamVerdict({ message }: { message: Message }) {
  if (message.spam_score === undefined && message.is_spam === undefined) return null;
  const score = message.spam_score;
  const verdict = message.is_spam === true ? "Spam" : message.is_spam === false ? "Not spam" : "Not scored";
  return (
    <section className="spam" aria-label="Spam verdict">
      <p>
        <strong>{verdict}</strong>
        {typeof score === "number" && ` · score ${(score * 100).toFixed(0)} / 100`}
        {message.spam_label && ` · you marked it ${message.spam_label === "spam" ? "spam" : "not spam"}`}
      </p>
      {message.indicators && message.indicators.length > 0 && (
        <ul className="indicators">
          {message.indicators.map((i) => (
            <li key={i.name}>
              <code>{i.name}</code> {i.weight >= 0 ? "+" : ""}
              {i.weight.toFixed(2)} — {i.detail}
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}

export function MessageView({
  messageId,
  onReply,
  onGone,
}: {
  messageId: string;
  onReply: (m: Message) => void;
  onGone: () => void;
}) {
  const { api, track, finished } = useTracker();
  const [message, setMessage] = useState<Message | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [actionError, setActionError] = useState<string | null>(null);

  useEffect(() => {
    let live = true;
    setError(null);
    api.message(messageId, true).then(
      (m) => live && setMessage(m),
      (err) => live && setError(describeError(err)),
    );
    return () => {
      live = false;
    };
  }, [api, messageId, finished]);

  const srcDoc = useMemo(() => (message?.body?.html ? sanitizedDocument(message.body.html) : null), [message]);

  const act = async (label: string, call: () => Promise<{ task_id: string } & object>, after?: () => void) => {
    setActionError(null);
    try {
      track((await call()) as Parameters<typeof track>[0], label);
      after?.();
    } catch (err) {
      setActionError(describeError(err));
    }
  };

  if (error) return <p className="error-text" role="alert">{error}</p>;
  if (!message || message.id !== messageId) return <p className="muted">Loading the message…</p>;
  const body = message.body;
  return (
    <article className="message-view" aria-labelledby="message-subject">
      <h2 id="message-subject" tabIndex={-1}>
        {message.subject || "(no subject)"}
      </h2>
      <dl className="headers">
        <dt>From</dt>
        <dd>{message.from}</dd>
        <dt>To</dt>
        <dd>{message.to.join(", ")}</dd>
        {message.cc.length > 0 && (
          <>
            <dt>Cc</dt>
            <dd>{message.cc.join(", ")}</dd>
          </>
        )}
        <dt>Date</dt>
        <dd>{when(message.date)}</dd>
        <dt>Folder</dt>
        <dd>{message.folder}</dd>
      </dl>
      <SpamVerdict message={message} />
      <div className="actions">
        <button type="button" onClick={() => onReply(message)}>
          Reply
        </button>
        <ConfirmButton
          question="Move this message to Trash?"
          confirmText="Move to Trash"
          onConfirm={() => void act(`Delete: ${message.subject}`, () => api.deleteMessages(message.account_id, [message.id], false), onGone)}
        >
          Delete
        </ConfirmButton>
        <ConfirmButton
          className="danger"
          question="Delete this message for good? This cannot be undone."
          confirmText="Delete for good"
          onConfirm={() => void act(`Delete for good: ${message.subject}`, () => api.deleteMessages(message.account_id, [message.id], true), onGone)}
        >
          Delete permanently
        </ConfirmButton>
        <button type="button" onClick={() => void act(`Mark spam: ${message.subject}`, () => api.markSpam(message.id, true))}>
          Mark spam
        </button>
        <button type="button" onClick={() => void act(`Not spam: ${message.subject}`, () => api.markSpam(message.id, false))}>
          Not spam
        </button>
        <button
          type="button"
          onClick={() => void act(`Spam check: ${message.subject}`, () => api.spamCheck(message.account_id, { message_ids: [message.id] }))}
        >
          Check for spam
        </button>
      </div>
      <p className="error-text" role="alert">
        {actionError ?? ""}
      </p>
      {body?.truncated && <p className="muted">This message is large: only its first part is shown.</p>}
      {srcDoc ? (
        <iframe className="html-body" title="Message content" sandbox="" srcDoc={srcDoc} referrerPolicy="no-referrer" />
      ) : (
        <pre className="text-body">{body?.text ?? message.snippet}</pre>
      )}
      {body && body.attachments.length > 0 && (
        <section aria-label="Attachments">
          <h3>Attachments</h3>
          <ul>
            {body.attachments.map((a, i) => (
              <li key={`${a.filename}-${i}`}>
                {a.filename} <span className="muted">({a.content_type}, {a.size.toLocaleString()} bytes)</span>
              </li>
            ))}
          </ul>
        </section>
      )}
    </article>
  );
}
