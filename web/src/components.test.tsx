import { act, fireEvent, render, screen, waitFor } from "@testing-library/react";
import { beforeEach, describe, expect, it } from "vitest";

import { App } from "./App";
import { ConfirmButton } from "./components/Confirm";
import { TaskProgress } from "./components/TaskProgress";
import { AccountForm, accountBody } from "./pages/AccountForm";
import { addresses, Compose } from "./pages/Compose";
import { sanitizedDocument } from "./pages/MessageView";
import { fakeApi, fakeFetch, task } from "./test/fakeApi";
import { TrackerProvider } from "./tracker";

beforeEach(() => {
  sessionStorage.clear();
  history.replaceState(null, "", "/");
});

describe("TaskProgress", () => {
  it("shows progress, stage and state, and a failure's error text", async () => {
    const { api } = fakeApi(() => ({
      status: 200,
      body: task({ state: "failed", progress: 30, stage: "INBOX", error: { code: "mail_auth_failed", message: "IMAP login refused" } }),
    }));
    render(<TaskProgress api={api} taskId="t1" label="Sync: ann@example.test" />);
    const alert = await screen.findByRole("alert");
    expect(alert.textContent).toContain("IMAP login refused (mail_auth_failed)");
    const bar = screen.getByRole("progressbar", { name: "Sync: ann@example.test" });
    expect(bar.getAttribute("aria-valuenow")).toBe("30");
    expect(screen.getByText("Failed")).toBeTruthy();
    expect(screen.queryByRole("button", { name: "Cancel" })).toBeNull();
  });

  it("has a cancel button while it runs, which asks the API once", async () => {
    let asked = false;
    const { api, calls } = fakeApi((call) => {
      if (call.method === "POST") asked = true;
      return { status: call.method === "POST" ? 202 : 200, body: task({ progress: 55, cancel_requested: asked }) };
    });
    render(<TaskProgress api={api} taskId="t1" label="Sync" />);
    const button = await screen.findByRole("button", { name: "Cancel" });
    await act(async () => {
      fireEvent.click(button);
    });
    await waitFor(() => expect(screen.getByText(/stopping/)).toBeTruthy());
    expect(calls.filter((c) => c.method === "POST" && c.path === "/api/tasks/t1/cancel")).toHaveLength(1);
    expect((screen.getByRole("button", { name: "Cancel" }) as HTMLButtonElement).disabled).toBe(true);
  });
});

describe("ConfirmButton", () => {
  it("asks before acting, focuses the question, and Escape gives the focus back", async () => {
    let done = 0;
    render(
      <ConfirmButton question="Remove it?" confirmText="Remove" onConfirm={() => done++}>
        Remove account
      </ConfirmButton>,
    );
    fireEvent.click(screen.getByRole("button", { name: "Remove account" }));
    expect(done).toBe(0);
    const yes = screen.getByRole("button", { name: "Remove" });
    expect(document.activeElement).toBe(yes);
    fireEvent.keyDown(yes, { key: "Escape" });
    await waitFor(() => expect(document.activeElement).toBe(screen.getByRole("button", { name: "Remove account" })));
    expect(done).toBe(0);
    fireEvent.click(screen.getByRole("button", { name: "Remove account" }));
    fireEvent.click(screen.getByRole("button", { name: "Remove" }));
    expect(done).toBe(1);
  });
});

describe("AccountForm", () => {
  it("shows the API's validation errors beside their fields", async () => {
    let submitted: Record<string, unknown> | null = null;
    const { api } = fakeApi(() => ({
      status: 422,
      body: {
        error: {
          code: "validation_error",
          message: "email: Value error, not an email address: 'x'",
          details: [
            { loc: ["email"], msg: "Value error, not an email address: 'x'", type: "value_error" },
            { loc: ["imap", "host"], msg: "String should match pattern", type: "string_pattern_mismatch" },
          ],
        },
      },
    }));
    render(
      <AccountForm
        onCancel={() => undefined}
        onSubmit={async (body) => {
          submitted = body;
          await api.createAccount(body);
        }}
      />,
    );
    fireEvent.change(screen.getByLabelText("Email address"), { target: { value: "x" } });
    await act(async () => {
      fireEvent.click(screen.getByRole("button", { name: "Add account" }));
    });
    const email = screen.getByLabelText("Email address");
    expect(email.getAttribute("aria-invalid")).toBe("true");
    expect(document.getElementById(email.getAttribute("aria-describedby")!)!.textContent).toBe("not an email address: 'x'");
    const host = document.getElementById("new-imap.host")!;
    expect(document.getElementById(host.getAttribute("aria-describedby")!)!.textContent).toBe("String should match pattern");
    expect(document.activeElement).toBe(email);
    expect(submitted).toMatchObject({ email: "x", imap: { port: 993, tls: "ssl" } });
  });

  it("a PATCH carries only what changed, and no password unless one was typed", () => {
    const account = {
      id: "a1",
      email: "ann@example.test",
      name: "Ann",
      imap: { host: "imap.example.test", port: 993, tls: "ssl" as const, username: "ann" },
      smtp: { host: "smtp.example.test", port: 465, tls: "ssl" as const, username: "ann" },
      sync_interval: 900,
      last_sync_at: null,
      last_sync_error: null,
      sync_task_id: null,
      capabilities: null,
      created_at: "",
      updated_at: "",
    };
    const fields = {
      email: account.email,
      name: "Ann B",
      imap: { host: "imap.example.test", port: "993", tls: "ssl" as const, username: "ann", password: "" },
      smtp: { host: "smtp2.example.test", port: "465", tls: "ssl" as const, username: "ann", password: "pw" },
      sync_interval: "900",
      spam_auto_scan: false,
      spam_move_to_junk: false,
    };
    expect(accountBody(fields, account)).toEqual({ name: "Ann B", smtp: { host: "smtp2.example.test", password: "pw" } });
  });
});

describe("Compose", () => {
  it("a double click sends once, and every try of one compose carries the same Idempotency-Key", async () => {
    let release: () => void = () => undefined;
    const { api, calls } = fakeApi(
      () =>
        new Promise((resolve) => {
          release = () =>
            resolve({ status: 202, body: { task_id: "t9", state: "queued", queue: "send", status_url: "/api/tasks/t9", deduplicated: false } });
        }),
    );
    let done = 0;
    render(
      <TrackerProvider api={api}>
        <Compose accountId="a1" onDone={() => done++} />
      </TrackerProvider>,
    );
    fireEvent.change(screen.getByLabelText("To"), { target: { value: "bob@example.test, carol@example.test" } });
    fireEvent.change(screen.getByLabelText("Subject"), { target: { value: "Hello" } });
    const send = screen.getByRole("button", { name: "Send" });
    await act(async () => {
      fireEvent.click(send);
      fireEvent.click(send);
    });
    await act(async () => release());
    const sends = calls.filter((c) => c.path === "/api/accounts/a1/send");
    expect(sends).toHaveLength(1);
    expect(sends[0].body).toEqual({ to: ["bob@example.test", "carol@example.test"], subject: "Hello", text: "" });
    expect(sends[0].headers["Idempotency-Key"]).toMatch(/^[0-9a-f-]{32,36}$/);
    expect(done).toBe(1);
    expect(JSON.parse(sessionStorage.getItem("mailroom.tasks")!)).toEqual([{ id: "t9", label: "Send: Hello" }]);
  });
});

describe("recipients", () => {
  it("are bare addresses, or {email, name} with a display name", () => {
    expect(addresses('bob@example.test; "Ann Example" <ann@example.test>,\n<c@example.test>')).toEqual([
      "bob@example.test",
      { email: "ann@example.test", name: "Ann Example" },
      "c@example.test",
    ]);
  });
});

describe("message HTML", () => {
  it("is sanitised and loads nothing from outside", () => {
    const doc = sanitizedDocument('<p onclick="x()">Hi</p><script>alert(1)</script><img src="https://t.example/p.gif"><a href="javascript:alert(1)">l</a>');
    expect(doc).not.toContain("<script>alert");
    expect(doc).not.toContain("onclick");
    expect(doc).not.toContain("javascript:");
    expect(doc).toContain("<p>Hi</p>");
    expect(doc).not.toContain("t.example");
    expect(doc).toContain('alt="[remote image not loaded]"');
    expect(doc).toContain("default-src 'none'");
  });
});

describe("App", () => {
  it("keeps the key in sessionStorage only, never in the URL, and signs out", async () => {
    const { fetcher, calls } = fakeFetch((call) => {
      if (call.path.startsWith("/api/accounts")) return { status: 200, body: { items: [], total: 0, limit: 200, offset: 0, next_offset: null } };
      if (call.path === "/api/admin/health") return { status: 403, body: { error: { code: "forbidden", message: "admin only", details: null } } };
      return { status: 200, body: { items: [], total: 0, limit: 25, offset: 0, next_offset: null } };
    });
    globalThis.fetch = fetcher;
    render(<App />);
    fireEvent.change(screen.getByLabelText("API key"), { target: { value: "mr_secret_key" } });
    await act(async () => {
      fireEvent.click(screen.getByRole("button", { name: "Sign in" }));
    });
    await screen.findByRole("heading", { name: "Accounts", level: 1 });
    expect(sessionStorage.getItem("mailroom.key")).toBe("mr_secret_key");
    expect(location.href).not.toContain("mr_secret_key");
    expect(calls.every((c) => !c.path.includes("mr_secret_key") && c.headers.Authorization === "Bearer mr_secret_key")).toBe(true);
    expect(screen.queryByRole("link", { name: "Admin" })).toBeNull(); // a member
    await act(async () => {
      fireEvent.click(screen.getByRole("button", { name: "Sign out" }));
    });
    expect(sessionStorage.getItem("mailroom.key")).toBeNull();
    expect(screen.getByLabelText("API key")).toBeTruthy();
  });

  it("says so when the API cannot be reached instead of spinning", async () => {
    globalThis.fetch = fakeFetch(() => "network-down").fetcher;
    render(<App />);
    fireEvent.change(screen.getByLabelText("API key"), { target: { value: "mr_k" } });
    await act(async () => {
      fireEvent.click(screen.getByRole("button", { name: "Sign in" }));
    });
    const alerts = await screen.findAllByRole("alert");
    expect(alerts.map((a) => a.textContent).join(" ")).toMatch(/cannot be reached/);
  });
});
