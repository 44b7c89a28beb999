import { useCallback, useEffect, useState } from "react";

import { Account, describeError, Folder } from "../api";
import { ConfirmButton } from "../components/Confirm";
import { Link } from "../router";
import { useTracker } from "../tracker";
import { AccountForm } from "./AccountForm";

export function when(iso: string | null): string {
  if (!iso) return "never";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function AccountCard({ account, onChanged }: { account: Account; onChanged: () => void }) {
  const { api, track, finished } = useTracker();
  const [editing, setEditing] = useState(false);
  const [folders, setFolders] = useState<Folder[] | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let live = true;
    api.folders(account.id).then(
      (r) => live && setFolders(r.items),
      () => live && setFolders(null),
    );
    return () => {
      live = false;
    };
  }, [api, account.id, finished]);

  const run = async (what: string, call: () => Promise<{ task_id: string } & object>) => {
    setError(null);
    try {
      const accepted = await call();
      track(accepted as Parameters<typeof track>[0], `${what}: ${account.email}`);
    } catch (err) {
      setError(describeError(err));
    }
  };
  const folderErrors = (folders ?? []).filter((f) => f.last_error);

  return (
    <li className="card account" data-account-id={account.id}>
      <h2 className="card-title">{account.email}</h2>
      <p className="muted">
        {account.name || "—"} · IMAP {account.imap.host}:{account.imap.port} · SMTP {account.smtp.host}:{account.smtp.port}
      </p>
      <p>
        Last sync: <time dateTime={account.last_sync_at ?? undefined}>{when(account.last_sync_at)}</time>
        {folders && ` · ${folders.length} folders, ${folders.reduce((n, f) => n + f.message_count, 0)} messages`}
      </p>
      {account.last_sync_error && <p className="error-text">Last sync failed: {account.last_sync_error}</p>}
      {folderErrors.length > 0 && (
        <ul className="error-text" aria-label="Folder errors">
          {folderErrors.map((f) => (
            <li key={f.id}>
              {f.name}: {f.last_error}
            </li>
          ))}
        </ul>
      )}
      <div className="actions">
        <button type="button" onClick={() => void run("Sync", () => api.sync(account.id))}>
          Sync
        </button>
        <button type="button" onClick={() => void run("Verify", () => api.verify(account.id))}>
          Verify
        </button>
        <button type="button" onClick={() => void run("Spam check", () => api.spamCheck(account.id, { folder: "INBOX" }))}>
          Spam check INBOX
        </button>
        <Link to={`/mail?account=${encodeURIComponent(account.id)}`} className="button">
          Open mail
        </Link>
        <button type="button" onClick={() => setEditing((v) => !v)} aria-expanded={editing}>
          Edit
        </button>
        <ConfirmButton
          className="danger"
          question={`Remove ${account.email} from Mailroom?`}
          confirmText="Remove"
          onConfirm={() =>
            api.deleteAccount(account.id).then(onChanged, (err) => setError(describeError(err)))
          }
        >
          Remove
        </ConfirmButton>
      </div>
      <p className="error-text" role="alert">
        {error ?? ""}
      </p>
      {editing && (
        <AccountForm
          account={account}
          onCancel={() => setEditing(false)}
          onSubmit={async (body) => {
            await api.updateAccount(account.id, body);
            setEditing(false);
            onChanged();
          }}
        />
      )}
    </li>
  );
}

export function AccountsPage() {
  const { api, finished } = useTracker();
  const [accounts, setAccounts] = useState<Account[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [adding, setAdding] = useState(false);

  const load = useCallback(() => {
    api.listAccounts().then(
      (page) => {
        setAccounts(page.items);
        setError(null);
      },
      (err) => setError(describeError(err)),
    );
  }, [api]);
  useEffect(load, [load, finished]);

  return (
    <>
      <h1 tabIndex={-1}>Accounts</h1>
      <p className="error-text" role="alert">
        {error ?? ""}
      </p>
      <button type="button" onClick={() => setAdding((v) => !v)} aria-expanded={adding}>
        Add an account
      </button>
      {adding && (
        <AccountForm
          onCancel={() => setAdding(false)}
          onSubmit={async (body) => {
            await api.createAccount(body);
            setAdding(false);
            load();
          }}
        />
      )}
      {accounts === null && !error && <p className="muted">Loading…</p>}
      {accounts?.length === 0 && <p>No accounts yet: add one to start.</p>}
      <ul className="cards">
        {accounts?.map((a) => <AccountCard key={a.id} account={a} onChanged={load} />)}
      </ul>
    </>
  );
}
