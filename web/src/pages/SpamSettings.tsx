import { FormEvent, useEffect, useState } from "react";

import { ApiError, describeError, SpamSettings } from "../api";
import { useTracker } from "../tracker";

const lines = (text: string) =>
  text
    .split(/[\n,]/)
    .map((s) => s.trim())
    .filter(Boolean);

/** The tenant's spam filter: threshold and sender lists (admins may change them). */
export function SpamSettingsForm() {
  const { api } = useTracker();
  const [loaded, setLoaded] = useState<SpamSettings | null>(null);
  const [threshold, setThreshold] = useState("");
  const [allow, setAllow] = useState("");
  const [block, setBlock] = useState("");
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [status, setStatus] = useState("");

  const show = (s: SpamSettings) => {
    setLoaded(s);
    setThreshold(String(s.threshold));
    setAllow(s.allow.join("\n"));
    setBlock(s.block.join("\n"));
  };
  useEffect(() => {
    api.spamSettings().then(show, (err) => setStatus(describeError(err)));
  }, [api]);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setErrors({});
    setStatus("");
    try {
      show(await api.updateSpamSettings({ threshold: Number(threshold), allow: lines(allow), block: lines(block) }));
      setStatus("Saved.");
    } catch (err) {
      const fields = err instanceof ApiError ? err.fieldErrors() : {};
      const pick = (name: string) => Object.entries(fields).find(([k]) => k === name || k.startsWith(`${name}.`))?.[1] ?? "";
      setErrors({ threshold: pick("threshold"), allow: pick("allow"), block: pick("block") });
      setStatus(describeError(err));
    }
  };

  const area = (id: "allow" | "block", label: string, value: string, set: (v: string) => void) => (
    <div className="field">
      <label htmlFor={`spam-${id}`}>{label}</label>
      <textarea
        id={`spam-${id}`}
        rows={4}
        value={value}
        onChange={(e) => set(e.target.value)}
        aria-invalid={errors[id] ? true : undefined}
        aria-describedby={`spam-${id}-error`}
      />
      <span id={`spam-${id}-error`} className="field-error">
        {errors[id] ?? ""}
      </span>
    </div>
  );

  return (
    <form className="spam-settings" onSubmit={submit} noValidate aria-labelledby="spam-h">
      <h2 id="spam-h">Spam filter</h2>
      {loaded && <p className="muted">Learned from {loaded.learned.toLocaleString()} messages marked by your users.</p>}
      <div className="field">
        <label htmlFor="spam-threshold">Threshold (0.01–0.99: a score at or above it is spam)</label>
        <input
          id="spam-threshold"
          type="number"
          step="0.01"
          min="0.01"
          max="0.99"
          value={threshold}
          onChange={(e) => setThreshold(e.target.value)}
          aria-invalid={errors.threshold ? true : undefined}
          aria-describedby="spam-threshold-error"
        />
        <span id="spam-threshold-error" className="field-error">
          {errors.threshold ?? ""}
        </span>
      </div>
      {area("allow", "Never spam (addresses or domains, one a line)", allow, setAllow)}
      {area("block", "Always spam (addresses or domains, one a line)", block, setBlock)}
      <div className="actions">
        <button type="submit" disabled={!loaded}>
          Save spam settings
        </button>
        <span aria-live="polite">{status}</span>
      </div>
    </form>
  );
}
