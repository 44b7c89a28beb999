import { act, render, renderHook, screen } from "@testing-library/react";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { TaskDock } from "./components/TaskDock";
import { nextDelay, POLL_FIRST_MS, POLL_MAX_MS, usePolledTask } from "./poll";
import { saveTracked } from "./session";
import { fakeApi, task } from "./test/fakeApi";
import { TrackerProvider } from "./tracker";

async function advance(ms: number) {
  await act(async () => {
    await vi.advanceTimersByTimeAsync(ms);
  });
}

function taskPolls(calls: { method: string; path: string }[]) {
  return calls.filter((c) => c.method === "GET" && c.path.startsWith("/api/tasks/")).length;
}

describe("usePolledTask", () => {
  beforeEach(() => {
    vi.useFakeTimers();
    sessionStorage.clear();
  });
  afterEach(() => vi.useRealTimers());

  it("backs off from 0.5 s by 1.5 up to 5 s while nothing changes", async () => {
    expect(nextDelay(POLL_FIRST_MS)).toBe(750);
    expect(nextDelay(4000)).toBe(POLL_MAX_MS);
    const { api, calls } = fakeApi(() => ({ status: 200, body: task() }));
    renderHook(() => usePolledTask(api, "t1"));
    await advance(0);
    expect(taskPolls(calls)).toBe(1); // at once
    // Waits: 500, 750, 1125, 1688, 2532, 3798, 5000, 5000 ...
    const waits = [500, 750, 1125, 1688, 2532, 3798, 5000, 5000];
    for (const [i, wait] of waits.entries()) {
      await advance(wait - 1);
      expect(taskPolls(calls)).toBe(i + 1);
      await advance(1);
      expect(taskPolls(calls)).toBe(i + 2);
    }
  });

  it("comes back to 0.5 s when the task moves", async () => {
    let progress = 10;
    const { api, calls } = fakeApi(() => ({ status: 200, body: task({ progress }) }));
    renderHook(() => usePolledTask(api, "t1"));
    await advance(0);
    await advance(500 + 750 + 1125); // 4 polls, the next wait is 1688
    expect(taskPolls(calls)).toBe(4);
    progress = 50;
    await advance(1688); // sees the change
    expect(taskPolls(calls)).toBe(5);
    await advance(500); // so the next poll is 0.5 s later again
    expect(taskPolls(calls)).toBe(6);
  });

  it("stops when the task is final and reports it once", async () => {
    let state: "running" | "succeeded" = "running";
    const finals: string[] = [];
    const { api, calls } = fakeApi(() => ({ status: 200, body: task({ state, progress: state === "succeeded" ? 100 : 40 }) }));
    const { result } = renderHook(() => usePolledTask(api, "t1", (t) => finals.push(t.state)));
    await advance(0);
    state = "succeeded";
    await advance(500);
    expect(result.current.task?.progress).toBe(100);
    expect(result.current.polling).toBe(false);
    const seen = taskPolls(calls);
    await advance(60_000);
    expect(taskPolls(calls)).toBe(seen);
    expect(finals).toEqual(["succeeded"]);
  });

  it("stops on a 404 (task gone) and keeps trying while the API is unreachable", async () => {
    const gone = fakeApi(() => ({ status: 404, body: { error: { code: "not_found", message: "task not found", details: null } } }));
    const a = renderHook(() => usePolledTask(gone.api, "t1"));
    await advance(0);
    await advance(30_000);
    expect(taskPolls(gone.calls)).toBe(1);
    expect(a.result.current.polling).toBe(false);

    const down = fakeApi(() => "network-down");
    const b = renderHook(() => usePolledTask(down.api, "t2"));
    await advance(0);
    await advance(500 + 750 + 1125);
    expect(taskPolls(down.calls)).toBe(4);
    expect(b.result.current.error).toBeInstanceOf(Error);
    expect(b.result.current.polling).toBe(true);
  });

  it("stops polling when unmounted", async () => {
    const { api, calls } = fakeApi(() => ({ status: 200, body: task() }));
    const { unmount } = renderHook(() => usePolledTask(api, "t1"));
    await advance(0);
    unmount();
    await advance(20_000);
    expect(taskPolls(calls)).toBe(1);
  });

  it("cancel asks the API, shows the answer and polls again from 0.5 s until it stops", async () => {
    let state: "running" | "cancelled" = "running";
    let cancelRequested = false;
    const { api, calls } = fakeApi((call) => {
      if (call.method === "POST" && call.path === "/api/tasks/t1/cancel") {
        cancelRequested = true;
        return { status: 202, body: task({ cancel_requested: true }) };
      }
      return { status: 200, body: task({ state, cancel_requested: cancelRequested }) };
    });
    const { result } = renderHook(() => usePolledTask(api, "t1"));
    await advance(0);
    await advance(500 + 750 + 1125 + 1688); // backed off: the next poll is 2.5 s away
    const before = taskPolls(calls);
    await act(async () => {
      await result.current.cancel();
    });
    expect(calls.some((c) => c.method === "POST" && c.path === "/api/tasks/t1/cancel")).toBe(true);
    expect(result.current.task?.cancel_requested).toBe(true);
    expect(taskPolls(calls)).toBe(before + 1); // polled again at once
    state = "cancelled";
    await advance(500); // and 0.5 s later, not 2.5 s
    expect(taskPolls(calls)).toBe(before + 2);
    expect(result.current.task?.state).toBe("cancelled");
    expect(result.current.polling).toBe(false);
  });
});

describe("tracked tasks after a reload", () => {
  beforeEach(() => {
    vi.useFakeTimers();
    sessionStorage.clear();
  });
  afterEach(() => vi.useRealTimers());

  it("picks up the tasks this tab dispatched and polls them again", async () => {
    saveTracked([
      { id: "t-run", label: "Sync: ann@example.test" },
      { id: "t-done", label: "Send: hello" },
    ]);
    const { api, calls } = fakeApi((call) =>
      call.path.endsWith("t-run")
        ? { status: 200, body: task({ id: "t-run", progress: 42, stage: "INBOX: 420 of 1000" }) }
        : { status: 200, body: task({ id: "t-done", type: "send", state: "succeeded", progress: 100, stage: "done" }) },
    );
    render(
      <TrackerProvider api={api}>
        <TaskDock />
      </TrackerProvider>,
    );
    await advance(0);
    const bars = screen.getAllByRole("progressbar");
    expect(bars.map((b) => b.getAttribute("aria-valuenow"))).toEqual(["42", "100"]);
    expect(screen.getByText("Sync: ann@example.test")).toBeTruthy();
    await advance(5000);
    const runs = calls.filter((c) => c.path.endsWith("t-run")).length;
    const dones = calls.filter((c) => c.path.endsWith("t-done")).length;
    expect(runs).toBeGreaterThan(2);
    expect(dones).toBe(1);
  });
});
