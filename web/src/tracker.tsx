import { createContext, ReactNode, useCallback, useContext, useMemo, useState } from "react";

import { Api, Task, TaskAccepted } from "./api";
import { loadTracked, saveTracked, Tracked } from "./session";

interface TrackerValue {
  api: Api;
  tracked: Tracked[];
  track: (accepted: TaskAccepted, label: string) => void;
  dismiss: (id: string) => void;
  /** Grows by one whenever a tracked task ends: pages re-read what it may have changed. */
  finished: number;
  onFinal: (task: Task) => void;
}

const Context = createContext<TrackerValue | null>(null);
const MAX_TRACKED = 20;

export function TrackerProvider({ api, children }: { api: Api; children: ReactNode }) {
  const [tracked, setTracked] = useState<Tracked[]>(loadTracked);
  const [finished, setFinished] = useState(0);

  const update = useCallback((next: (old: Tracked[]) => Tracked[]) => {
    setTracked((old) => {
      const value = next(old).slice(0, MAX_TRACKED);
      saveTracked(value);
      return value;
    });
  }, []);
  const track = useCallback(
    (accepted: TaskAccepted, label: string) =>
      update((old) => [{ id: accepted.task_id, label }, ...old.filter((t) => t.id !== accepted.task_id)]),
    [update],
  );
  const dismiss = useCallback((id: string) => update((old) => old.filter((t) => t.id !== id)), [update]);
  const onFinal = useCallback(() => setFinished((n) => n + 1), []);

  const value = useMemo(() => ({ api, tracked, track, dismiss, finished, onFinal }), [api, tracked, track, dismiss, finished, onFinal]);
  return <Context.Provider value={value}>{children}</Context.Provider>;
}

export function useTracker(): TrackerValue {
  const value = useContext(Context);
  if (!value) throw new Error("useTracker outside TrackerProvider");
  return value;
}
