import { useEffect, useMemo, useRef, useState } from "react";

import { Api } from "./api";
import { TaskDock } from "./components/TaskDock";
import { AccountsPage } from "./pages/Accounts";
import { AdminPage } from "./pages/Admin";
import { MailPage } from "./pages/Mail";
import { Identity, identify, SignIn } from "./pages/SignIn";
import { TasksPage } from "./pages/Tasks";
import { Link, navigate, useLocation } from "./router";
import { clearSession, loadKey, saveKey } from "./session";
import { TrackerProvider } from "./tracker";

type Fetch = typeof fetch;

/** A fetch that tells whether the API answered at all, for the banner. */
function watchedFetch(report: (reachable: boolean) => void): Fetch {
  return async (...args) => {
    try {
      const response = await fetch(...args);
      report(![502, 503, 504].includes(response.status) || response.headers.get("content-type")?.includes("json") === true);
      return response;
    } catch (err) {
      report(false);
      throw err;
    }
  };
}

const PAGES = [
  { path: "/accounts", title: "Accounts" },
  { path: "/mail", title: "Mail" },
  { path: "/tasks", title: "Tasks" },
] as const;

export function App() {
  const [who, setWho] = useState<Identity | null>(null);
  const [restoring, setRestoring] = useState(() => loadKey() !== null);
  const [reachable, setReachable] = useState(true);
  const [restoreError, setRestoreError] = useState<string | null>(null);
  const { path } = useLocation();
  const main = useRef<HTMLElement>(null);

  const makeApi = useMemo(() => {
    const fetcher = watchedFetch(setReachable);
    return (key: string) => new Api(key, fetcher);
  }, []);
  const api = useMemo(() => (who ? makeApi(who.key) : null), [who, makeApi]);

  // After a reload: the key is still in this tab's sessionStorage, check it again.
  useEffect(() => {
    const key = loadKey();
    if (!key) return;
    let tries = 0;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const attempt = () =>
      identify(key, makeApi).then(
        (id) => {
          setWho(id);
          setRestoring(false);
        },
        (err) => {
          if (err?.name === "UnreachableError" && tries++ < 1000) {
            setRestoreError("The Mailroom API cannot be reached; trying again…");
            timer = setTimeout(attempt, 3000);
            return;
          }
          clearSession();
          setRestoring(false);
        },
      );
    attempt();
    return () => clearTimeout(timer);
  }, [makeApi]);

  // Each new page moves the focus to its heading, for keyboard and screen-reader users.
  useEffect(() => {
    main.current?.querySelector<HTMLElement>("h1")?.focus();
  }, [path, who]);

  const banner = !reachable && (
    <div className="banner" role="alert">
      The Mailroom API cannot be reached. Check that the server is running; this page keeps trying.
    </div>
  );

  if (!who || !api) {
    if (restoring)
      return (
        <>
          {banner}
          <main id="main" className="signin">
            <p>{restoreError ?? "Signing in…"}</p>
          </main>
        </>
      );
    return (
      <>
        {banner}
        <SignIn
          makeApi={makeApi}
          onSignedIn={(id) => {
            saveKey(id.key);
            setWho(id);
            if (path === "/") navigate("/accounts");
          }}
        />
      </>
    );
  }

  const pages = who.admin ? [...PAGES, { path: "/admin", title: "Admin" }] : PAGES;
  let page;
  if (path.startsWith("/mail")) page = <MailPage />;
  else if (path.startsWith("/tasks")) page = <TasksPage />;
  else if (path.startsWith("/admin") && who.admin) page = <AdminPage />;
  else if (path.startsWith("/admin")) page = <><h1 tabIndex={-1}>Admin</h1><p>This page needs the admin role.</p></>;
  else page = <AccountsPage />;

  return (
    <TrackerProvider api={api}>
      <a className="skip" href="#main">
        Skip to content
      </a>
      {banner}
      <header className="top">
        <span className="brand">Mailroom</span>
        <nav aria-label="Main">
          {pages.map((p) => (
            <Link key={p.path} to={p.path} current={path.startsWith(p.path) || (path === "/" && p.path === "/accounts")}>
              {p.title}
            </Link>
          ))}
        </nav>
        <button
          type="button"
          className="quiet"
          onClick={() => {
            clearSession();
            setWho(null);
            navigate("/");
          }}
        >
          Sign out
        </button>
      </header>
      <div className="layout">
        <main id="main" ref={main}>
          {page}
        </main>
        <TaskDock />
      </div>
    </TrackerProvider>
  );
}
