import { act, fireEvent, render, screen } from "@testing-library/react";
import { beforeEach, describe, expect, it } from "vitest";

import { Message } from "./api";
import { MailPage } from "./pages/Mail";
import { fakeApi } from "./test/fakeApi";
import { TrackerProvider } from "./tracker";

function message(n: number): Message {
  return {
    id: `m${n}`,
    account_id: "a1",
    folder_id: "f1",
    folder: "INBOX",
    uid: n,
    message_id: `<m${n}@example.test>`,
    in_reply_to: null,
    subject: `Message ${n}`,
    from: "bob@example.test",
    to: ["ann@example.test"],
    cc: [],
    date: "2026-11-23T09:31:12Z",
    flags: [],
    seen: n % 2 === 0,
    flagged: false,
    size: 100,
    snippet: "",
    attachments: [],
    spam_score: null,
    is_spam: n === 2 ? true : null,
    indicators: [],
    spam_label: null,
  };
}

const account = { id: "a1", email: "ann@example.test" };
const folders = [
  { id: "f1", name: "INBOX", special_use: null, message_count: 3, unread_count: 2, server_message_count: 3, last_synced_at: null, last_error: null },
  { id: "f2", name: "Archive", special_use: null, message_count: 0, unread_count: 0, server_message_count: null, last_synced_at: null, last_error: "NO [UNAVAILABLE] try later" },
];

describe("Mail", () => {
  beforeEach(() => {
    sessionStorage.clear();
    history.replaceState(null, "", "/mail?account=a1");
  });

  it("lists folders with counts, pages with the API's cursor and searches", async () => {
    const { api, calls } = fakeApi((call) => {
      const url = new URL(call.path, "http://x");
      if (url.pathname === "/api/accounts") return { status: 200, body: { items: [account], total: 1, limit: 200, offset: 0, next_offset: null } };
      if (url.pathname.endsWith("/folders")) return { status: 200, body: { items: folders } };
      const cursor = url.searchParams.get("cursor");
      if (url.searchParams.get("subject")) return { status: 200, body: { items: [message(9)], next_cursor: null } };
      return cursor === "c2"
        ? { status: 200, body: { items: [message(3)], next_cursor: null } }
        : { status: 200, body: { items: [message(1), message(2)], next_cursor: "c2" } };
    });
    render(
      <TrackerProvider api={api}>
        <MailPage />
      </TrackerProvider>,
    );
    await screen.findByRole("link", { name: /Message 1/ });
    expect(screen.getByLabelText("3 messages, 2 unread")).toBeTruthy();
    expect(screen.getByText(/sync failed: NO \[UNAVAILABLE\]/)).toBeTruthy();
    expect(screen.getByText("spam")).toBeTruthy();
    const newer = screen.getByRole("button", { name: "Newer" }) as HTMLButtonElement;
    expect(newer.disabled).toBe(true);

    await act(async () => fireEvent.click(screen.getByRole("button", { name: "Older" })));
    await screen.findByRole("link", { name: /Message 3/ });
    expect(calls.at(-1)!.path).toContain("cursor=c2");
    expect((screen.getByRole("button", { name: "Older" }) as HTMLButtonElement).disabled).toBe(true);

    await act(async () => fireEvent.click(screen.getByRole("button", { name: "Newer" })));
    await screen.findByRole("link", { name: /Message 1/ });
    expect(calls.at(-1)!.path).not.toContain("cursor=");

    fireEvent.change(screen.getByLabelText("Search"), { target: { value: "quarterly" } });
    await act(async () => fireEvent.click(screen.getByRole("button", { name: "Search" })));
    await screen.findByRole("link", { name: /Message 9/ });
    const search = calls.at(-1)!.path;
    expect(search).toContain("subject=quarterly");
    expect(search).toContain("folder=INBOX");
    expect(location.search).toContain("q=quarterly");
  });
});
