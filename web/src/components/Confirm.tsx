import { ReactNode, useEffect, useRef, useState } from "react";

/** A button that asks once more, inline, before it acts; the question takes the focus and
 * Escape or "Keep" puts it back. */
export function ConfirmButton({
  children,
  question,
  confirmText,
  onConfirm,
  disabled,
  className,
}: {
  children: ReactNode;
  question: string;
  confirmText: string;
  onConfirm: () => void;
  disabled?: boolean;
  className?: string;
}) {
  const [asking, setAsking] = useState(false);
  const yes = useRef<HTMLButtonElement>(null);
  const opener = useRef<HTMLButtonElement>(null);
  useEffect(() => {
    if (asking) yes.current?.focus();
  }, [asking]);
  const close = () => {
    setAsking(false);
    setTimeout(() => opener.current?.focus(), 0);
  };
  if (!asking)
    return (
      <button ref={opener} type="button" className={className} disabled={disabled} onClick={() => setAsking(true)}>
        {children}
      </button>
    );
  return (
    <span role="group" aria-label={question} className="confirm" onKeyDown={(e) => e.key === "Escape" && close()}>
      <span className="confirm-q">{question}</span>
      <button
        ref={yes}
        type="button"
        className="danger"
        onClick={() => {
          setAsking(false);
          onConfirm();
        }}
      >
        {confirmText}
      </button>
      <button type="button" onClick={close}>
        Keep
      </button>
    </span>
  );
}
