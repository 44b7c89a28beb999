import { useCallback, useEffect, useRef, useState } from "react";

import { Api, ApiError, FINAL_STATES, Task, UnreachableError } from "./api";

// Polling of GET /api/tasks/{id}: first after 0.5 s, then each wait 1.5 times the last, up
// to 5 s, while nothing changes; any change (state, progress, stage) brings it back to
// 0.5 s, so a moving progress bar stays live and a stalled task costs little. Polling stops
// when the task is final, when it is gone (404) or the key is refused (401), and when the
// component using it unmounts.
export const POLL_FIRST_MS = 500;
export const POLL_MAX_MS = 5000;
export const POLL_FACTOR = 1.5;

export function nextDelay(previous: number): number {
  return Math.min(POLL_MAX_MS, Math.round(previous * POLL_FACTOR));
}

function fingerprint(task: Task): string {
  return `${task.state}|${task.progress}|${task.stage}|${task.cancel_requested}|${task.attempts}`;
}

export interface PolledTask {
  task: Task | null;
  /** The last poll's error (the task keeps its last known state meanwhile). */
  error: unknown;
  /** True while polling goes on (not final, not stopped by an error). */
  polling: boolean;
  cancel: () => Promise<void>;
  cancelError: unknown;
}

export function usePolledTask(api: Api, taskId: string, onFinal?: (task: Task) => void): PolledTask {
  const [task, setTask] = useState<Task | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [polling, setPolling] = useState(true);
  const [cancelError, setCancelError] = useState<unknown>(null);
  const [wake, setWake] = useState(0);
  const finalRef = useRef(onFinal);
  finalRef.current = onFinal;

  useEffect(() => {
    let stopped = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let delay = POLL_FIRST_MS;
    let seen = "";
    setPolling(true);

    const tick = async (): Promise<void> => {
      try {
        const current = await api.task(taskId);
        if (stopped) return;
        setTask(current);
        setError(null);
        if (FINAL_STATES.has(current.state)) {
          setPolling(false);
          finalRef.current?.(current);
          return;
        }
        const now = fingerprint(current);
        if (now !== seen) delay = POLL_FIRST_MS;
        seen = now;
      } catch (err) {
        if (stopped) return;
        setError(err);
        if (err instanceof ApiError && (err.status === 404 || err.status === 401 || err.status === 403)) {
          setPolling(false);
          return;
        }
        if (!(err instanceof UnreachableError) && !(err instanceof ApiError)) {
          setPolling(false);
          return;
        }
      }
      timer = setTimeout(() => void tick(), delay);
      delay = nextDelay(delay);
    };
    void tick();
    return () => {
      stopped = true;
      if (timer !== undefined) clearTimeout(timer);
    };
  }, [api, taskId, wake]);

  const cancel = useCallback(async () => {
    setCancelError(null);
    try {
      const answer = await api.cancel(taskId);
      setTask(answer);
    } catch (err) {
      setCancelError(err);
    }
    setWake((n) => n + 1); // poll again from 0.5 s to see it stop
  }, [api, taskId]);

  return { task, error, polling, cancel, cancelError };
}
