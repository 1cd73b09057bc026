// A few lines instead of a framework: build elements, replace children, navigate.

export type Child = Node | string | number | null | undefined | false | Child[];
export type Attrs = Record<string, unknown>;

/** A page of the dashboard: its element, and what to stop when the router leaves it. Lives here
 * (not in main.ts, which imports every view) so that the views import nothing above them. */
export interface View {
  el: HTMLElement;
  destroy(): void;
}

/** An element with attributes (`on*` functions become listeners; `class`, `for`, `data-*` and
 * `aria-*` attributes; anything else a property) and children (strings become text). */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value as EventListener);
    } else if (key === "class" || key === "for" || key === "style" || key.includes("-") || key === "role") {
      el.setAttribute(key === "class" ? "class" : key, String(value));
    } else {
      (el as unknown as Record<string, unknown>)[key] = value;
    }
  }
  append(el, children);
  return el;
}

function append(parent: Node, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else parent.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace every child of `el`. */
export function fill(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, children);
}

/** Go to a hash route ("#/trainings/abc"). */
export function go(hash: string): void {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = hash;
}

/** Run `fn` now and then `ms` after each run finishes, until the returned stop() is called. */
export function every(ms: number, fn: () => Promise<unknown> | unknown): () => void {
  let stopped = false;
  let timer: number | undefined;
  const tick = async () => {
    try {
      await fn();
    } catch (err) {
      console.warn(err);
    }
    if (!stopped) timer = window.setTimeout(tick, ms);
  };
  void tick();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}
