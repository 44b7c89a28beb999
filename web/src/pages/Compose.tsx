import { FormEvent, useRef, useState } from "react";

import { ApiError, Attachment, describeError, Message, Recipient, SendBody, TaskAccepted } from "../api";
import { useTracker } from "../tracker";

export function newIdempotencyKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function toBase64(data: ArrayBuffer): string {
  const bytes = new Uint8Array(data);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function readAttachment(file: File): Promise<Attachment> {
  return { filename: file.name, content_type: file.type || "application/octet-stream", content: toBase64(await file.arrayBuffer()) };
}

/** "a@b.example, Ann <ann@example.test>" as the API takes recipients: a bare address, or
 * {email, name} when a display name is given. */
export function addresses(text: string): Recipient[] {
  return text
    .split(/[,;\n]/)
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const named = /^"?([^"<]*?)"?\s*<([^>]+)>$/.exec(s);
      if (!named) return s;
      return named[1] ? { email: named[2].trim(), name: named[1].trim() } : named[2].trim();
    });
}

/** One compose: one Idempotency-Key for its whole life, so a double click, or a retry
 * after a lost answer, sends once. */
export function Compose({ accountId, replyTo, onDone }: { accountId: string; replyTo?: Message; onDone: () => void }) {
  const { api, track } = useTracker();
  const [key] = useState(newIdempotencyKey);
  const [to, setTo] = useState(replyTo ? replyTo.from : "");
  const [cc, setCc] = useState("");
  const [subject, setSubject] = useState(replyTo ? (/^re:/i.test(replyTo.subject) ? replyTo.subject : `Re: ${replyTo.subject}`) : "");
  const [text, setText] = useState(replyTo ? `\n\n> ${(replyTo.body?.text ?? replyTo.snippet).split("\n").join("\n> ")}` : "");
  const [files, setFiles] = useState<File[]>([]);
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [general, setGeneral] = useState<string | null>(null);
  const [sent, setSent] = useState<TaskAccepted | null>(null);
  const sending = useRef(false);
  const [busy, setBusy] = useState(false);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (sending.current || sent) return;
    sending.current = true;
    setBusy(true);
    setErrors({});
    setGeneral(null);
    try {
      const body: SendBody = { to: addresses(to), subject, text };
      if (cc.trim()) body.cc = addresses(cc);
      if (replyTo?.message_id) {
        body.in_reply_to = replyTo.message_id;
        body.references = [replyTo.message_id];
      }
      if (files.length) body.attachments = await Promise.all(files.map(readAttachment));
      const accepted = await api.send(accountId, body, key);
      setSent(accepted);
      track(accepted, `Send: ${subject || "(no subject)"}`);
      onDone();
    } catch (err) {
      setErrors(err instanceof ApiError ? err.fieldErrors() : {});
      setGeneral(describeError(err));
    } finally {
      sending.current = false;
      setBusy(false);
    }
  };

  const fieldError = (name: string) =>
    Object.entries(errors)
      .filter(([k]) => k === name || k.startsWith(`${name}.`))
      .map(([, v]) => v)[0] ?? "";

  return (
    <form className="compose" onSubmit={submit} noValidate aria-label={replyTo ? "Reply" : "New message"}>
      <h2>{replyTo ? "Reply" : "New message"}</h2>
      <div className="field">
        <label htmlFor="compose-to">To</label>
        <input id="compose-to" value={to} onChange={(e) => setTo(e.target.value)} aria-describedby="compose-to-error" autoFocus />
        <span id="compose-to-error" className="field-error">
          {fieldError("to")}
        </span>
      </div>
      <div className="field">
        <label htmlFor="compose-cc">Cc</label>
        <input id="compose-cc" value={cc} onChange={(e) => setCc(e.target.value)} aria-describedby="compose-cc-error" />
        <span id="compose-cc-error" className="field-error">
          {fieldError("cc")}
        </span>
      </div>
      <div className="field">
        <label htmlFor="compose-subject">Subject</label>
        <input id="compose-subject" value={subject} onChange={(e) => setSubject(e.target.value)} aria-describedby="compose-subject-error" />
        <span id="compose-subject-error" className="field-error">
          {fieldError("subject")}
        </span>
      </div>
      <div className="field">
        <label htmlFor="compose-text">Message</label>
        <textarea id="compose-text" rows={8} value={text} onChange={(e) => setText(e.target.value)} />
      </div>
      <div className="field">
        <label htmlFor="compose-files">Attachments</label>
        <input id="compose-files" type="file" multiple onChange={(e) => setFiles(Array.from(e.target.files ?? []))} aria-describedby="compose-files-error" />
        <span id="compose-files-error" className="field-error">
          {fieldError("attachments")}
        </span>
      </div>
      <p className="form-error" role="alert">
        {general ?? ""}
      </p>
      <div className="actions">
        <button type="submit" disabled={busy || sent !== null}>
          {busy ? "Sending…" : "Send"}
        </button>
        <button type="button" className="quiet" onClick={onDone}>
          Discard
        </button>
      </div>
    </form>
  );
}
