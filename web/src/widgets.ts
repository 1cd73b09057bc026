// Small pieces the views share: status badges, progress bars, errors, schema-driven inputs.

import { ApiError, LineError, Status, TERMINAL } from "./api";
import { Child, h } from "./dom";
import type { Field } from "./format";

export function badge(status: Status | "paused"): HTMLElement {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

export function bar(fraction: number | null, status: Status): HTMLElement {
  const pct = fraction === null ? 0 : Math.round(fraction * 100);
  const moving = !TERMINAL.includes(status) && fraction === null;
  return h(
    "div",
    { class: `bar ${status}${moving ? " moving" : ""}`, role: "progressbar", "aria-valuenow": String(pct) },
    h("div", { class: "bar-fill", style: `width: ${moving ? 100 : pct}%` }),
  );
}

export function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** "line 7 · completion: must be a string, not number" */
export function lineError(e: LineError): HTMLElement {
  const where = e.line ? `line ${e.line}` : (e.file ?? "file");
  return h(
    "li",
    { class: "line-error" },
    h("span", { class: "where" }, where),
    e.field ? h("code", null, e.field) : null,
    e.field ? ": " : " ",
    e.reason,
  );
}

/** An error box: the problem's detail, and its per-line errors if any. */
export function errorBox(err: unknown): HTMLElement {
  const lines = err instanceof ApiError ? err.errors.filter((e) => e.line !== undefined && e.line !== null) : [];
  return h(
    "div",
    { class: "error-box", role: "alert" },
    h("div", null, lines.length ? message(err).split("\n")[0] : message(err)),
    lines.length ? h("ul", { class: "line-errors" }, lines.slice(0, 50).map(lineError)) : null,
  );
}

export function card(title: Child, ...children: Child[]): HTMLElement {
  return h("section", { class: "card" }, title ? h("h2", null, title) : null, ...children);
}

export function kv(rows: [string, Child][]): HTMLElement {
  return h("dl", { class: "kv" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

export interface FieldInput {
  field: Field;
  row: HTMLElement;
  input: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement;
  error: HTMLElement;
  /** The raw value: string, or boolean for a checkbox. */
  raw(): string | boolean;
}

/** A labelled input for one schema field, with its default filled in and its description as help. */
export function fieldInput(field: Field, value?: unknown): FieldInput {
  const id = `in-${field.name}`;
  const initial = value !== undefined ? value : field.default;
  let input: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement;
  if (field.kind === "boolean") {
    input = h("input", { type: "checkbox", id, name: field.name, checked: Boolean(initial) });
  } else if (field.kind === "enum") {
    input = h(
      "select",
      { id, name: field.name },
      field.options.map((o) => h("option", { value: o, selected: o === initial }, o)),
    );
  } else {
    const numeric = field.kind === "integer" || field.kind === "number";
    input = h("input", {
      type: numeric ? "number" : "text",
      step: field.kind === "integer" ? "1" : "any",
      id,
      name: field.name,
      value: initial === null || initial === undefined ? "" : String(initial),
      placeholder: field.nullable ? "default" : "",
    });
    if (numeric && field.min !== undefined) input.setAttribute("min", String(field.min));
    if (numeric && field.max !== undefined) input.setAttribute("max", String(field.max));
  }
  const error = h("div", { class: "field-error", role: "alert" });
  const shownDefault =
    field.default === null || field.default === undefined
      ? "none"
      : String(field.default);
  const label = h("label", { for: id }, field.name);
  const row = h(
    "div",
    { class: `field ${field.kind}`, "data-field": field.name },
    field.kind === "boolean" ? h("div", { class: "check" }, input, label) : [label, input],
    h("div", { class: "help" }, field.description, field.required ? null : h("span", { class: "default" }, ` default: ${shownDefault}`)),
    error,
  );
  const raw = () => (input instanceof HTMLInputElement && input.type === "checkbox" ? input.checked : input.value);
  return { field, row, input, error, raw };
}
