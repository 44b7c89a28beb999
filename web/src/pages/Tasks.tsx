import { useEffect, useState } from "react";

import { Account, describeError, FINAL_STATES, Page, Task, TASK_STATES, TASK_TYPES } from "../api";
import { useTracker } from "../tracker";
import { when } from "./Accounts";

const LIMIT = 25;

export function TaskTable({ tasks, accounts }: { tasks: Task[]; accounts: Account[] }) {
  const { track } = useTracker();
  const email = (id: string | null) => accounts.find((a) => a.id === id)?.email ?? "—";
  return (
    <table className="tasks">
      <thead>
        <tr>
          <th scope="col">Type</th>
          <th scope="col">Account</th>
          <th scope="col">State</th>
          <th scope="col">Progress</th>
          <th scope="col">Created</th>
          <th scope="col">
            <span className="visually-hidden">Actions</span>
          </th>
        </tr>
      </thead>
      <tbody>
        {tasks.map((t) => (
          <tr key={t.id} data-task-id={t.id}>
            <td>{t.type}</td>
            <td>{email(t.account_id)}</td>
            <td>
              {t.state}
              {t.error?.message && <div className="error-text small-text">{t.error.message}</div>}
            </td>
            <td>
              {t.progress}% {t.stage}
            </td>
            <td>{when(t.created_at)}</td>
            <td>
              {!FINAL_STATES.has(t.state) && (
                <button type="button" className="small" onClick={() => track({ task_id: t.id, state: t.state, queue: t.queue, status_url: "", deduplicated: true }, `${t.type}: ${email(t.account_id)}`)}>
                  Watch
                </button>
              )}
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function TasksPage() {
  const { api, finished } = useTracker();
  const [state, setState] = useState("");
  const [type, setType] = useState("");
  const [account, setAccount] = useState("");
  const [offset, setOffset] = useState(0);
  const [page, setPage] = useState<Page<Task> | null>(null);
  const [accounts, setAccounts] = useState<Account[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [reload, setReload] = useState(0);

  useEffect(() => {
    api.listAccounts().then((p) => setAccounts(p.items), () => undefined);
  }, [api]);
  useEffect(() => setOffset(0), [state, type, account]);
  useEffect(() => {
    let live = true;
    api.tasks({ state, type, account_id: account, limit: String(LIMIT), offset: String(offset) }).then(
      (p) => {
        if (!live) return;
        setPage(p);
        setError(null);
      },
      (err) => live && setError(describeError(err)),
    );
    return () => {
      live = false;
    };
  }, [api, state, type, account, offset, finished, reload]);

  return (
    <>
      <h1 tabIndex={-1}>Task history</h1>
      <form className="filters" onSubmit={(e) => e.preventDefault()} aria-label="Filter tasks">
        <label htmlFor="filter-state">State</label>
        <select id="filter-state" value={state} onChange={(e) => setState(e.target.value)}>
          <option value="">any</option>
          {TASK_STATES.map((s) => (
            <option key={s}>{s}</option>
          ))}
        </select>
        <label htmlFor="filter-type">Type</label>
        <select id="filter-type" value={type} onChange={(e) => setType(e.target.value)}>
          <option value="">any</option>
          {TASK_TYPES.map((s) => (
            <option key={s}>{s}</option>
          ))}
        </select>
        <label htmlFor="filter-account">Account</label>
        <select id="filter-account" value={account} onChange={(e) => setAccount(e.target.value)}>
          <option value="">any</option>
          {accounts.map((a) => (
            <option key={a.id} value={a.id}>
              {a.email}
            </option>
          ))}
        </select>
        <button type="button" onClick={() => setReload((n) => n + 1)}>
          Refresh
        </button>
      </form>
      <p className="error-text" role="alert">
        {error ?? ""}
      </p>
      {page && (
        <>
          <p className="muted">
            {page.total} task{page.total === 1 ? "" : "s"}
          </p>
          <div className="table-wrap">
            <TaskTable tasks={page.items} accounts={accounts} />
          </div>
          <div className="pager">
            <button type="button" disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - LIMIT))}>
              Newer
            </button>
            <button type="button" disabled={page.next_offset === null} onClick={() => page.next_offset !== null && setOffset(page.next_offset)}>
              Older
            </button>
          </div>
        </>
      )}
    </>
  );
}
