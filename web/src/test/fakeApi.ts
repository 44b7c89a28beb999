// The network is the one thing outside the page: tests answer its fetch calls here, with
// the real Api class, hooks and components on top.
import { vi } from "vitest";

import { Api, Task } from "../api";

export interface Call {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: unknown;
}

export type Handler = (call: Call) => { status: number; body?: unknown } | Promise<{ status: number; body?: unknown }> | "network-down";

export function fakeFetch(handler: Handler) {
  const calls: Call[] = [];
  const fetcher = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    const call: Call = {
      method: init?.method ?? "GET",
      path: String(input),
      headers: (init?.headers ?? {}) as Record<string, string>,
      body: init?.body ? JSON.parse(String(init.body)) : undefined,
    };
    calls.push(call);
    const answer = await handler(call);
    if (answer === "network-down") throw new TypeError("Failed to fetch");
    return new Response(answer.body === undefined ? null : JSON.stringify(answer.body), {
      status: answer.status,
      headers: { "Content-Type": "application/json" },
    });
  });
  return { fetcher: fetcher as unknown as typeof fetch, calls };
}

export function fakeApi(handler: Handler) {
  const { fetcher, calls } = fakeFetch(handler);
  return { api: new Api("mr_test_key", fetcher), calls };
}

export function task(patch: Partial<Task> = {}): Task {
  return {
    id: "t1",
    type: "sync",
    queue: "sync",
    state: "running",
    progress: 10,
    stage: "INBOX",
    account_id: "a1",
    origin: "api",
    params: {},
    attempts: 1,
    max_retries: 5,
    cancel_requested: false,
    result: null,
    error: null,
    estimated_duration: 3,
    next_retry_at: null,
    created_at: "2026-11-23T09:31:12Z",
    started_at: "2026-11-23T09:31:12Z",
    finished_at: null,
    duration: null,
    ...patch,
  };
}
