import { FormEvent, useEffect, useState } from "react";

import { Account, describeError, Folder, Message } from "../api";
import { navigate, useLocation } from "../router";
import { useTracker } from "../tracker";
import { when } from "./Accounts";
import { Compose } from "./Compose";
import { MessageView } from "./MessageView";

const PAGE_SIZE = 25;

function mailUrl(params: Record<string, string | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  return `/mail?${q.toString()}`;
}

export function MailPage() {
  const { api, finished } = useTracker();
  const { query } = useLocation();
  const [accounts, setAccounts] = useState<Account[] | null>(null);
  const [folders, setFolders] = useState<Folder[]>([]);
  const [messages, setMessages] = useState<Message[] | null>(null);
  const [cursors, setCursors] = useState<(string | undefined)[]>([undefined]); // one per page seen
  const [next, setNext] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [search, setSearch] = useState(query.get("q") ?? "");
  const [searchIn, setSearchIn] = useState<"subject" | "from">("subject");
  const [compose, setCompose] = useState<{ replyTo?: Message } | null>(null);

  const accountId = query.get("account") ?? accounts?.[0]?.id;
  const folder = query.get("folder") ?? "INBOX";
  const messageId = query.get("message") ?? undefined;
  const q = query.get("q") ?? "";
  const field = (query.get("in") as "subject" | "from" | null) ?? "subject";
  const cursor = cursors[cursors.length - 1];

  useEffect(() => {
    api.listAccounts().then(
      (p) => setAccounts(p.items),
      (err) => setError(describeError(err)),
    );
  }, [api]);

  useEffect(() => {
    if (!accountId) return;
    let live = true;
    api.folders(accountId).then(
      (r) => live && setFolders(r.items),
      (err) => live && setError(describeError(err)),
    );
    return () => {
      live = false;
    };
  }, [api, accountId, finished]);

  useEffect(() => setCursors([undefined]), [accountId, folder, q, field]);

  useEffect(() => {
    if (!accountId) return;
    let live = true;
    api
      .messages(accountId, { folder, limit: String(PAGE_SIZE), cursor, [field]: q || undefined })
      .then(
        (page) => {
          if (!live) return;
          setMessages(page.items);
          setNext(page.next_cursor);
          setError(null);
        },
        (err) => live && setError(describeError(err)),
      );
    return () => {
      live = false;
    };
  }, [api, accountId, folder, cursor, q, field, finished]);

  const go = (patch: Record<string, string | undefined>) =>
    navigate(mailUrl({ account: accountId, folder, q: q || undefined, in: q ? field : undefined, message: messageId, ...patch }));

  const submitSearch = (e: FormEvent) => {
    e.preventDefault();
    go({ q: search.trim() || undefined, in: search.trim() ? searchIn : undefined, message: undefined });
  };

  if (accounts && accounts.length === 0) return <><h1 tabIndex={-1}>Mail</h1><p>Add an account first.</p></>;
  return (
    <>
      <h1 tabIndex={-1}>Mail</h1>
      <p className="error-text" role="alert">
        {error ?? ""}
      </p>
      <div className="mail-bar">
        <label htmlFor="mail-account">Account</label>
        <select id="mail-account" value={accountId ?? ""} onChange={(e) => navigate(mailUrl({ account: e.target.value }))}>
          {accounts?.map((a) => (
            <option key={a.id} value={a.id}>
              {a.email}
            </option>
          ))}
        </select>
        <button type="button" onClick={() => setCompose({})} disabled={!accountId}>
          New message
        </button>
      </div>
      {compose && accountId && <Compose key={compose.replyTo?.id ?? "new"} accountId={accountId} replyTo={compose.replyTo} onDone={() => setCompose(null)} />}
      <div className="mail">
        <nav className="folders" aria-label="Folders">
          <ul>
            {folders.map((f) => (
              <li key={f.id}>
                <button
                  type="button"
                  className={f.name === folder ? "folder current" : "folder"}
                  aria-current={f.name === folder ? "true" : undefined}
                  onClick={() => go({ folder: f.name, message: undefined, q: undefined, in: undefined })}
                >
                  <span className="folder-name">{f.name}</span>
                  <span className="count" aria-label={`${f.message_count} messages, ${f.unread_count} unread`}>
                    {f.unread_count > 0 ? `${f.unread_count}/` : ""}
                    {f.message_count}
                  </span>
                  {f.last_error && <span className="error-text"> (sync failed: {f.last_error})</span>}
                </button>
              </li>
            ))}
          </ul>
        </nav>
        <section className="list" aria-label={`Messages in ${folder}`}>
          <form className="search" role="search" onSubmit={submitSearch}>
            <label htmlFor="mail-search">Search</label>
            <input id="mail-search" type="search" value={search} onChange={(e) => setSearch(e.target.value)} />
            <label htmlFor="mail-search-in" className="visually-hidden">
              Search in
            </label>
            <select id="mail-search-in" value={searchIn} onChange={(e) => setSearchIn(e.target.value as "subject" | "from")}>
              <option value="subject">Subject</option>
              <option value="from">From</option>
            </select>
            <button type="submit">Search</button>
          </form>
          {messages === null ? (
            <p className="muted">Loading…</p>
          ) : messages.length === 0 ? (
            <p>No messages{q ? ` matching “${q}”` : ""} in {folder}.</p>
          ) : (
            <ul className="messages">
              {messages.map((m) => (
                <li key={m.id}>
                  <a
                    href={mailUrl({ account: accountId, folder, message: m.id })}
                    className={`message-row${m.seen ? "" : " unread"}${m.id === messageId ? " current" : ""}`}
                    aria-current={m.id === messageId ? "true" : undefined}
                    onClick={(e) => {
                      e.preventDefault();
                      go({ message: m.id });
                    }}
                  >
                    <span className="from">{m.from}</span>
                    <span className="subject">{m.subject || "(no subject)"}</span>
                    <span className="date muted">{when(m.date)}</span>
                    {m.is_spam && <span className="tag">spam</span>}
                  </a>
                </li>
              ))}
            </ul>
          )}
          <div className="pager">
            <button type="button" disabled={cursors.length <= 1} onClick={() => setCursors((c) => c.slice(0, -1))}>
              Newer
            </button>
            <span className="muted">Page {cursors.length}</span>
            <button type="button" disabled={!next} onClick={() => next && setCursors((c) => [...c, next])}>
              Older
            </button>
          </div>
        </section>
        <section className="view" aria-label="Message">
          {messageId ? (
            <MessageView
              key={messageId}
              messageId={messageId}
              onReply={(m) => setCompose({ replyTo: m })}
              onGone={() => go({ message: undefined })}
            />
          ) : (
            <p className="muted">Choose a message to read it.</p>
          )}
        </section>
      </div>
    </>
  );
}
