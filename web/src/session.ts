// The API key lives in sessionStorage only: gone when the tab closes, never in a URL, a
// cookie or a log. Tracked task ids live beside it, so a reload picks them up again.
const KEY = "mailroom.key";
const TASKS = "mailroom.tasks";

export function loadKey(): string | null {
  return sessionStorage.getItem(KEY);
}

export function saveKey(key: string): void {
  sessionStorage.setItem(KEY, key);
}

export function clearSession(): void {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(TASKS);
}

export interface Tracked {
  id: string;
  label: string;
}

export function loadTracked(): Tracked[] {
  try {
    const value: unknown = JSON.parse(sessionStorage.getItem(TASKS) ?? "[]");
    return Array.isArray(value)
      ? value.filter((t): t is Tracked => typeof t?.id === "string" && typeof t?.label === "string")
      : [];
  } catch {
    return [];
  }
}

export function saveTracked(tasks: Tracked[]): void {
  sessionStorage.setItem(TASKS, JSON.stringify(tasks));
}
