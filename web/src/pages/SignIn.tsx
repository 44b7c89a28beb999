import { FormEvent, useState } from "react";

import { Api, ApiError, describeError } from "../api";

export interface Identity {
  key: string;
  admin: boolean;
}

/** Checks a key against the API: a 401 means a wrong key; the admin routes tell the role. */
export async function identify(key: string, makeApi: (key: string) => Api): Promise<Identity> {
  const api = makeApi(key);
  await api.listAccounts();
  try {
    await api.health();
    return { key, admin: true };
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return { key, admin: false };
    throw err;
  }
}

export function SignIn({ onSignedIn, makeApi }: { onSignedIn: (who: Identity) => void; makeApi: (key: string) => Api }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setError(null);
    const trimmed = key.trim();
    if (!trimmed) {
      setError("Enter an API key.");
      return;
    }
    setBusy(true);
    try {
      onSignedIn(await identify(trimmed, makeApi));
    } catch (err) {
      setError(describeError(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <main id="main" className="signin">
      <h1>Mailroom</h1>
      <form onSubmit={submit} noValidate aria-describedby="signin-help">
        <p id="signin-help" className="muted">
          Sign in with a Mailroom API key (<code>mailroom key create</code>). It is kept in this tab only and
          forgotten when you sign out or close the tab.
        </p>
        <label htmlFor="api-key">API key</label>
        <input
          id="api-key"
          name="api-key"
          type="password"
          autoComplete="off"
          spellCheck={false}
          value={key}
          onChange={(e) => setKey(e.target.value)}
          aria-invalid={error ? true : undefined}
          aria-describedby={error ? "signin-error" : undefined}
          autoFocus
        />
        <p id="signin-error" className="field-error" role="alert">
          {error ?? ""}
        </p>
        <button type="submit" disabled={busy}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
