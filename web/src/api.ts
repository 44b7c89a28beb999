// The REST API as the page uses it (docs/api.md). Every call carries the API key as a
// Bearer header; the key never goes into a URL, and nothing here logs it.

export type TaskState = "queued" | "running" | "retrying" | "succeeded" | "failed" | "cancelled";
export const FINAL_STATES: ReadonlySet<string> = new Set(["succeeded", "failed", "cancelled"]);
export const TASK_STATES: TaskState[] = ["queued", "running", "retrying", "succeeded", "failed", "cancelled"];
export const TASK_TYPES = ["sync", "verify", "send", "delete", "spam_check"] as const;

export interface TaskError {
  code: string | null;
  message: string | null;
  reference?: string | null;
}

export interface Task {
  id: string;
  type: string;
  queue: string;
  state: TaskState;
  progress: number;
  stage: string;
  account_id: string | null;
  origin: string;
  params: Record<string, unknown>;
  attempts: number;
  max_retries: number;
  cancel_requested: boolean;
  result: Record<string, unknown> | null;
  error: TaskError | null;
  estimated_duration: number | null;
  next_retry_at: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  duration: number | null;
}

export interface TaskAccepted {
  task_id: string;
  state: TaskState;
  queue: string;
  status_url: string;
  deduplicated: boolean;
}

export interface Endpoint {
  host: string;
  port: number;
  tls: "ssl" | "starttls" | "none";
  username: string;
}

export interface EndpointIn extends Endpoint {
  password: string;
}

export interface Account {
  id: string;
  email: string;
  name: string;
  imap: Endpoint;
  smtp: Endpoint;
  sync_interval: number;
  last_sync_at: string | null;
  last_sync_error: string | null;
  sync_task_id: string | null;
  capabilities: string[] | null;
  created_at: string;
  updated_at: string;
  spam_auto_scan?: boolean;
  spam_move_to_junk?: boolean;
}

export interface Folder {
  id: string;
  name: string;
  special_use: string | null;
  message_count: number;
  unread_count: number;
  server_message_count: number | null;
  last_synced_at: string | null;
  last_error: string | null;
}

export interface Indicator {
  name: string;
  weight: number;
  detail: string;
}

export interface Message {
  id: string;
  account_id: string;
  folder_id: string;
  folder: string;
  uid: number;
  message_id: string | null;
  in_reply_to: string | null;
  subject: string;
  from: string;
  to: string[];
  cc: string[];
  date: string | null;
  flags: string[];
  seen: boolean;
  flagged: boolean;
  size: number;
  snippet: string;
  attachments: string[];
  spam_score?: number | null;
  is_spam?: boolean | null;
  indicators?: Indicator[];
  spam_label?: "spam" | "ham" | null;
  body?: MessageBody;
}

export interface MessageBody {
  text: string | null;
  html: string | null;
  headers: Record<string, string>;
  attachments: { filename: string; content_type: string; size: number }[];
  truncated?: boolean;
}

export interface Page<T> {
  items: T[];
  total: number;
  limit: number;
  offset: number;
  next_offset: number | null;
}

export interface MessagePage {
  items: Message[];
  next_cursor: string | null;
}

export interface Attachment {
  filename: string;
  content_type: string;
  content: string; // base64
}

export type Recipient = string | { email: string; name: string };

export interface SendBody {
  to: Recipient[];
  cc?: Recipient[];
  subject: string;
  text: string;
  in_reply_to?: string;
  references?: string[];
  attachments?: Attachment[];
}

export interface SpamSettings {
  threshold: number;
  allow: string[];
  block: string[];
  learned: number;
}

export interface Stats {
  queues: Record<string, { depth: number | null; priority: number }>;
  tasks_by_state: Record<string, number>;
  average_duration_seconds: Record<string, number>;
}

export interface Health {
  status: "ok" | "degraded";
  database: { ok: boolean; error?: string | null };
  broker: { ok: boolean; error?: string | null };
  result_backend: { ok: boolean; error?: string | null };
  workers: Record<string, number>;
}

/** An answer in the API's one error shape, or a status without one. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details: unknown = null,
  ) {
    super(message);
    this.name = "ApiError";
  }

  /** Validation messages by field path ("imap.host"), from a 422's details. */
  fieldErrors(): Record<string, string> {
    const out: Record<string, string> = {};
    if (this.status !== 422 || !Array.isArray(this.details)) return out;
    for (const item of this.details as { loc?: unknown[]; msg?: string }[]) {
      const loc = (item.loc ?? []).map(String).filter((p) => p !== "body");
      const key = loc.join(".") || "_";
      if (!(key in out)) out[key] = (item.msg ?? "invalid").replace(/^Value error, /, "");
    }
    return out;
  }
}

/** The API could not be reached at all (network down, server stopped, proxy error). */
export class UnreachableError extends Error {
  constructor(message = "The Mailroom API cannot be reached.") {
    super(message);
    this.name = "UnreachableError";
  }
}

type Fetch = typeof fetch;

export class Api {
  constructor(
    private readonly key: string,
    private readonly fetcher: Fetch = (...args) => fetch(...args),
    private readonly base = "",
  ) {}

  async request<T>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<T> {
    const init: RequestInit = {
      method,
      headers: {
        Authorization: `Bearer ${this.key}`,
        Accept: "application/json",
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        ...headers,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    };
    let response: Response;
    try {
      response = await this.fetcher(this.base + path, init);
    } catch {
      throw new UnreachableError();
    }
    if (response.status === 204) return undefined as T;
    const text = await response.text();
    let parsed: unknown = null;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = null;
    }
    if (!response.ok) {
      const err = (parsed as { error?: { code?: string; message?: string; details?: unknown } } | null)?.error;
      if (!err && [502, 503, 504].includes(response.status)) {
        throw new UnreachableError(`The Mailroom API is not answering (HTTP ${response.status}).`);
      }
      throw new ApiError(response.status, err?.code ?? "error", err?.message ?? `HTTP ${response.status}`, err?.details ?? null);
    }
    if (parsed === null) throw new UnreachableError("The server answered something that is not the Mailroom API.");
    return parsed as T;
  }

  // accounts
  listAccounts = () => this.request<Page<Account>>("GET", "/api/accounts?limit=200");
  getAccount = (id: string) => this.request<Account>("GET", `/api/accounts/${enc(id)}`);
  createAccount = (body: unknown) => this.request<Account>("POST", "/api/accounts", body);
  updateAccount = (id: string, body: unknown) => this.request<Account>("PATCH", `/api/accounts/${enc(id)}`, body);
  deleteAccount = (id: string) => this.request<void>("DELETE", `/api/accounts/${enc(id)}`);
  verify = (id: string) => this.request<TaskAccepted>("POST", `/api/accounts/${enc(id)}/verify`);
  sync = (id: string) => this.request<TaskAccepted>("POST", `/api/accounts/${enc(id)}/sync`);
  spamCheck = (id: string, body: { folder: string } | { message_ids: string[] }) =>
    this.request<TaskAccepted>("POST", `/api/accounts/${enc(id)}/spam-check`, body);
  send = (id: string, body: SendBody, idempotencyKey: string) =>
    this.request<TaskAccepted>("POST", `/api/accounts/${enc(id)}/send`, body, { "Idempotency-Key": idempotencyKey });
  deleteMessages = (id: string, messageIds: string[], permanent: boolean) =>
    this.request<TaskAccepted>("POST", `/api/accounts/${enc(id)}/delete`, { message_ids: messageIds, permanent });

  // mail
  folders = (id: string) => this.request<{ items: Folder[] }>("GET", `/api/accounts/${enc(id)}/folders`);
  messages = (id: string, query: Record<string, string | undefined>) =>
    this.request<MessagePage>("GET", `/api/accounts/${enc(id)}/messages?${qs(query)}`);
  message = (id: string, body = false) =>
    this.request<Message>("GET", `/api/messages/${enc(id)}${body ? "?body=1" : ""}`);
  markSpam = (id: string, spam: boolean) =>
    this.request<TaskAccepted>("POST", `/api/messages/${enc(id)}/${spam ? "spam" : "ham"}`);

  spamSettings = () => this.request<SpamSettings>("GET", "/api/spam/settings");
  updateSpamSettings = (body: Partial<Omit<SpamSettings, "learned">>) => this.request<SpamSettings>("PATCH", "/api/spam/settings", body);

  // tasks
  task = (id: string) => this.request<Task>("GET", `/api/tasks/${enc(id)}`);
  tasks = (query: Record<string, string | undefined>) => this.request<Page<Task>>("GET", `/api/tasks?${qs(query)}`);
  cancel = (id: string) => this.request<Task>("POST", `/api/tasks/${enc(id)}/cancel`);

  // admin
  stats = () => this.request<Stats>("GET", "/api/admin/stats");
  activeTasks = () => this.request<{ items: Task[] }>("GET", "/api/admin/active-tasks");
  health = () => this.request<Health>("GET", "/api/admin/health");
  cancelAll = () => this.request<{ cancelled: number; stopping: number }>("POST", "/api/admin/cancel-all");
}

function enc(id: string): string {
  return encodeURIComponent(id);
}

export function qs(query: Record<string, string | undefined>): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== "") params.set(k, v);
  return params.toString();
}

/** A short text for any error the page shows to a person. */
export function describeError(err: unknown): string {
  if (err instanceof ApiError) return err.status === 401 ? "The API key was refused (401)." : err.message;
  if (err instanceof UnreachableError) return err.message;
  return err instanceof Error ? err.message : String(err);
}
