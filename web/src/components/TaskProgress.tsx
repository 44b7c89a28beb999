import { Api, describeError, FINAL_STATES, Task, UnreachableError } from "../api";
import { usePolledTask } from "../poll";

const STATE_TEXT: Record<string, string> = {
  queued: "Queued",
  running: "Running",
  retrying: "Waiting to retry",
  succeeded: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};

// One dispatched task: a progress bar, its state and stage, the error when it fails and a
// cancel button while it can be cancelled. Every line has a fixed height, so nothing
// around it moves while it is polled.
export function TaskProgress({
  api,
  taskId,
  label,
  onFinal,
  onDismiss,
}: {
  api: Api;
  taskId: string;
  label: string;
  onFinal?: (task: Task) => void;
  onDismiss?: () => void;
}) {
  const { task, error, cancel, cancelError } = usePolledTask(api, taskId, onFinal);
  const progress = task?.progress ?? 0;
  const state = task?.state ?? "queued";
  const final = FINAL_STATES.has(state);
  const stage = task ? (task.cancel_requested && !final ? "stopping…" : task.stage || "") : "loading…";
  const headingId = `task-${taskId}-label`;
  return (
    <section className={`task task-${state}`} aria-labelledby={headingId} data-task-id={taskId} data-state={state}>
      <div className="task-head">
        <span id={headingId} className="task-label">
          {label}
        </span>
        <span className="task-state" aria-live="polite">
          {STATE_TEXT[state] ?? state}
        </span>
      </div>
      <div
        className="bar"
        role="progressbar"
        aria-labelledby={headingId}
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={progress}
        aria-valuetext={`${progress}% ${stage}`}
      >
        <div className="bar-fill" style={{ width: `${progress}%` }} />
      </div>
      <div className="task-foot">
        <span className="task-stage" title={stage}>
          {progress}% · {stage}
        </span>
        {!final && task && (
          <button type="button" className="small" onClick={() => void cancel()} disabled={task.cancel_requested}>
            Cancel
          </button>
        )}
        {final && onDismiss && (
          <button type="button" className="small quiet" onClick={onDismiss} aria-label={`Dismiss ${label}`}>
            Dismiss
          </button>
        )}
      </div>
      <p className="task-error" role={task?.error && state === "failed" ? "alert" : undefined}>
        {state === "failed" || state === "retrying"
          ? `${task?.error?.message ?? ""}${task?.error?.code ? ` (${task.error.code})` : ""}`
          : error
            ? error instanceof UnreachableError
              ? "The API cannot be reached; still trying."
              : describeError(error)
            : cancelError
              ? describeError(cancelError)
              : " "}
      </p>
    </section>
  );
}
