import { useCallback, useEffect, useState } from "react";

import { Account, describeError, Health, Stats, Task } from "../api";
import { ConfirmButton } from "../components/Confirm";
import { useTracker } from "../tracker";
import { SpamSettingsForm } from "./SpamSettings";
import { TaskTable } from "./Tasks";

const REFRESH_MS = 5000;

interface Check {
  ok: boolean;
  error?: string | null;
}

export function AdminPage() {
  const { api } = useTracker();
  const [stats, setStats] = useState<Stats | null>(null);
  const [health, setHealth] = useState<Health | null>(null);
  const [active, setActive] = useState<Task[]>([]);
  const [accounts, setAccounts] = useState<Account[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string>("");

  const load = useCallback(async () => {
    try {
      const [s, h, a] = await Promise.all([api.stats(), api.health(), api.activeTasks()]);
      setStats(s);
      setHealth(h);
      setActive(a.items);
      setError(null);
    } catch (err) {
      setError(describeError(err));
    }
  }, [api]);

  useEffect(() => {
    void load();
    api.listAccounts().then((p) => setAccounts(p.items), () => undefined);
    const timer = setInterval(() => void load(), REFRESH_MS);
    return () => clearInterval(timer);
  }, [api, load]);

  const queues = [...new Set([...Object.keys(stats?.queues ?? {}), ...Object.keys(health?.workers ?? {})])];
  return (
    <>
      <h1 tabIndex={-1}>Admin</h1>
      <p className="error-text" role="alert">
        {error ?? ""}
      </p>
      <section aria-labelledby="health-h">
        <h2 id="health-h">Health: {health ? health.status : "…"}</h2>
        {health && (
          <ul className="checks-list">
            {Object.entries(health)
              .filter((e): e is [string, Check] => typeof e[1] === "object" && e[1] !== null && "ok" in e[1])
              .map(([k, check]) => (
                <li key={k}>
                  {k.replace("_", " ")}: {check.ok ? "ok" : `failing${check.error ? ` (${check.error})` : ""}`}
                </li>
              ))}
          </ul>
        )}
      </section>
      <section aria-labelledby="queues-h">
        <h2 id="queues-h">Queues</h2>
        <div className="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Queue</th>
                <th scope="col">Waiting</th>
                <th scope="col">Workers</th>
                <th scope="col">Priority</th>
              </tr>
            </thead>
            <tbody>
              {queues.map((q) => (
                <tr key={q}>
                  <th scope="row">{q}</th>
                  <td>{stats?.queues[q]?.depth ?? "unknown"}</td>
                  <td className={health && !health.workers[q] ? "error-text" : undefined}>{health?.workers[q] ?? "…"}</td>
                  <td>{stats?.queues[q]?.priority ?? ""}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        {stats && (
          <p className="muted">
            Tasks by state:{" "}
            {Object.entries(stats.tasks_by_state)
              .map(([k, v]) => `${k} ${v}`)
              .join(" · ") || "none"}
          </p>
        )}
      </section>
      <section aria-labelledby="active-h">
        <h2 id="active-h">Active tasks ({active.length})</h2>
        <ConfirmButton
          className="danger"
          question="Cancel every queued and running task of this tenant?"
          confirmText="Cancel all"
          disabled={active.length === 0}
          onConfirm={() =>
            api.cancelAll().then(
              (r) => {
                setNotice(`${r.cancelled} cancelled, ${r.stopping} stopping.`);
                void load();
              },
              (err) => setError(describeError(err)),
            )
          }
        >
          Cancel all tasks
        </ConfirmButton>
        <p aria-live="polite">{notice}</p>
        {active.length === 0 ? (
          <p className="muted">Nothing queued or running.</p>
        ) : (
          <div className="table-wrap">
            <TaskTable tasks={active} accounts={accounts} />
          </div>
        )}
      </section>
      <SpamSettingsForm />
    </>
  );
}
