import { useTracker } from "../tracker";
import { TaskProgress } from "./TaskProgress";

/** Every task dispatched from this tab (and, after a reload, still tracked). */
export function TaskDock() {
  const { api, tracked, dismiss, onFinal } = useTracker();
  return (
    <aside className="dock" aria-label="Your tasks">
      <h2>Tasks in progress</h2>
      {tracked.length === 0 && <p className="muted">Nothing dispatched yet.</p>}
      {tracked.map((t) => (
        <TaskProgress key={t.id} api={api} taskId={t.id} label={t.label} onFinal={onFinal} onDismiss={() => dismiss(t.id)} />
      ))}
    </aside>
  );
}
