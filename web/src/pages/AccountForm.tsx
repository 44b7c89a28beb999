import { FormEvent, useState } from "react";

import { Account, ApiError, describeError } from "../api";

type Tls = "ssl" | "starttls" | "none";
interface EndpointFields {
  host: string;
  port: string;
  tls: Tls;
  username: string;
  password: string;
}
interface Fields {
  email: string;
  name: string;
  imap: EndpointFields;
  smtp: EndpointFields;
  sync_interval: string;
  spam_auto_scan: boolean;
  spam_move_to_junk: boolean;
}

function fromAccount(a?: Account): Fields {
  const ep = (e: Account["imap"] | undefined, port: string, tls: Tls): EndpointFields => ({
    host: e?.host ?? "",
    port: e ? String(e.port) : port,
    tls: (e?.tls as Tls) ?? tls,
    username: e?.username ?? "",
    password: "",
  });
  return {
    email: a?.email ?? "",
    name: a?.name ?? "",
    imap: ep(a?.imap, "993", "ssl"),
    smtp: ep(a?.smtp, "465", "ssl"),
    sync_interval: a ? String(a.sync_interval) : "900",
    spam_auto_scan: a?.spam_auto_scan ?? false,
    spam_move_to_junk: a?.spam_move_to_junk ?? false,
  };
}

function endpointBody(f: EndpointFields, old?: Account["imap"]): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  const port = Number(f.port);
  if (!old || f.host !== old.host) body.host = f.host;
  if (!old || port !== old.port) body.port = Number.isFinite(port) && f.port !== "" ? port : f.port;
  if (!old || f.tls !== old.tls) body.tls = f.tls;
  if (!old || f.username !== old.username) body.username = f.username;
  if (!old || f.password) body.password = f.password;
  return body;
}

/** The body of POST /api/accounts, or of a PATCH with only what changed. Spam settings are
 * sent only when they differ from the default (or from the account), so the form works
 * against an API of either version. */
export function accountBody(f: Fields, old?: Account): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  if (!old || f.email !== old.email) body.email = f.email;
  if (!old || f.name !== old.name) body.name = f.name;
  const imap = endpointBody(f.imap, old?.imap);
  const smtp = endpointBody(f.smtp, old?.smtp);
  if (Object.keys(imap).length) body.imap = imap;
  if (Object.keys(smtp).length) body.smtp = smtp;
  const interval = Number(f.sync_interval);
  if (!old || interval !== old.sync_interval) body.sync_interval = f.sync_interval === "" ? null : interval;
  if (f.spam_auto_scan !== (old?.spam_auto_scan ?? false)) body.spam_auto_scan = f.spam_auto_scan;
  if (f.spam_move_to_junk !== (old?.spam_move_to_junk ?? false)) body.spam_move_to_junk = f.spam_move_to_junk;
  return body;
}

export function AccountForm({
  account,
  onSubmit,
  onCancel,
}: {
  account?: Account;
  onSubmit: (body: Record<string, unknown>) => Promise<void>;
  onCancel: () => void;
}) {
  const [f, setF] = useState<Fields>(() => fromAccount(account));
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [general, setGeneral] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const prefix = account ? `edit-${account.id}` : "new";

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setErrors({});
    setGeneral(null);
    try {
      await onSubmit(accountBody(f, account));
    } catch (err) {
      const fields = err instanceof ApiError ? err.fieldErrors() : {};
      setErrors(fields);
      const known = Object.keys(fields).some((k) => document.getElementById(`${prefix}-${k}`));
      setGeneral(known ? "Please correct the fields marked below." : describeError(err));
      const first = Object.keys(fields)
        .map((k) => document.getElementById(`${prefix}-${k}`))
        .find(Boolean);
      first?.focus();
    } finally {
      setBusy(false);
    }
  };

  const text = (path: string, label: string, value: string, set: (v: string) => void, opts: { type?: string; hint?: string } = {}) => {
    const id = `${prefix}-${path}`;
    const err = errors[path];
    return (
      <div className="field">
        <label htmlFor={id}>{label}</label>
        <input
          id={id}
          type={opts.type ?? "text"}
          value={value}
          onChange={(e) => set(e.target.value)}
          aria-invalid={err ? true : undefined}
          aria-describedby={err ? `${id}-error` : undefined}
          placeholder={opts.hint}
          autoComplete="off"
        />
        <span id={`${id}-error`} className="field-error">
          {err ?? ""}
        </span>
      </div>
    );
  };

  const endpoint = (which: "imap" | "smtp") => {
    const ep = f[which];
    const set = (patch: Partial<EndpointFields>) => setF((old) => ({ ...old, [which]: { ...old[which], ...patch } }));
    const tlsId = `${prefix}-${which}.tls`;
    return (
      <fieldset>
        <legend>{which.toUpperCase()}</legend>
        {text(`${which}.host`, "Host", ep.host, (v) => set({ host: v }))}
        {text(`${which}.port`, "Port", ep.port, (v) => set({ port: v }), { type: "number" })}
        <div className="field">
          <label htmlFor={tlsId}>Security</label>
          <select id={tlsId} value={ep.tls} onChange={(e) => set({ tls: e.target.value as Tls })} aria-describedby={`${tlsId}-error`}>
            <option value="ssl">TLS (ssl)</option>
            <option value="starttls">STARTTLS</option>
            <option value="none">none (private hosts only)</option>
          </select>
          <span id={`${tlsId}-error`} className="field-error">
            {errors[`${which}.tls`] ?? ""}
          </span>
        </div>
        {text(`${which}.username`, "User name", ep.username, (v) => set({ username: v }))}
        {text(`${which}.password`, account ? "Password (blank: keep)" : "Password", ep.password, (v) => set({ password: v }), {
          type: "password",
        })}
      </fieldset>
    );
  };

  return (
    <form className="account-form" onSubmit={submit} noValidate aria-label={account ? `Edit ${account.email}` : "Add an account"}>
      <p className="form-error" role="alert">
        {general ?? ""}
      </p>
      {text("email", "Email address", f.email, (v) => setF({ ...f, email: v }), { type: "email" })}
      {text("name", "Display name", f.name, (v) => setF({ ...f, name: v }))}
      <div className="endpoints">
        {endpoint("imap")}
        {endpoint("smtp")}
      </div>
      {text("sync_interval", "Sync every (seconds)", f.sync_interval, (v) => setF({ ...f, sync_interval: v }), { type: "number" })}
      <div className="checks">
        <label>
          <input type="checkbox" checked={f.spam_auto_scan} onChange={(e) => setF({ ...f, spam_auto_scan: e.target.checked })} /> Score new
          mail for spam
        </label>
        <label>
          <input type="checkbox" checked={f.spam_move_to_junk} onChange={(e) => setF({ ...f, spam_move_to_junk: e.target.checked })} /> Move
          spam to Junk
        </label>
        <span className="field-error">{errors.spam_auto_scan ?? errors.spam_move_to_junk ?? ""}</span>
      </div>
      <div className="actions">
        <button type="submit" disabled={busy}>
          {account ? "Save" : "Add account"}
        </button>
        <button type="button" className="quiet" onClick={onCancel}>
          Cancel
        </button>
      </div>
    </form>
  );
}
