// Pure helpers: what the views compute from API objects (no DOM, unit-tested in test/).

import type { HistoryPoint, JsonSchema, Metrics, Training, TrainingSummary } from "./api";

/** "12s", "4m 05s", "2h 03m". */
export function duration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function seconds(iso: string | null | undefined): number | null {
  return iso ? Date.parse(iso) / 1000 : null;
}

/** "just now", "5m ago", "3h ago", else the date. */
export function ago(iso: string | null, now: number): string {
  const t = seconds(iso);
  if (t === null) return "–";
  const d = now - t;
  if (d < 10) return "just now";
  if (d < 3600 * 24) return `${duration(d).split(" ")[0]} ago`;
  return new Date(t * 1000).toISOString().slice(0, 10);
}

/** How long a training has run: started → completed (or now). */
export function runTime(t: Pick<Training, "started_at" | "completed_at">, now: number): number | null {
  const start = seconds(t.started_at);
  if (start === null) return null;
  return (seconds(t.completed_at) ?? now) - start;
}

export interface Progress {
  step: number;
  maxSteps: number | null;
  fraction: number | null;
}

export function progress(metrics: Metrics | null | undefined, status?: string): Progress {
  const step = typeof metrics?.step === "number" ? metrics.step : 0;
  const maxSteps = typeof metrics?.max_steps === "number" && metrics.max_steps > 0 ? metrics.max_steps : null;
  let fraction = maxSteps ? Math.min(1, step / maxSteps) : null;
  if (status === "succeeded") fraction = 1;
  return { step, maxSteps, fraction };
}

/** Records when a training's step changed, as this page saw it: seconds per step measured
 * here, since the metrics carry no clock of their own (unless history points have `time`). */
export class StepClock {
  private seen = new Map<string, { step: number; at: number }[]>();

  observe(id: string, step: number, now: number): void {
    const points = this.seen.get(id) ?? [];
    const last = points[points.length - 1];
    if (!last || step > last.step) points.push({ step, at: now });
    else if (step < last.step) points.splice(0, points.length, { step, at: now }); // resumed from a checkpoint
    this.seen.set(id, points.slice(-20));
  }

  secondsPerStep(id: string): number | null {
    const points = this.seen.get(id) ?? [];
    if (points.length < 3) return null; // the first change seen may have been mid-step
    const first = points[1];
    const last = points[points.length - 1];
    return (last.at - first.at) / (last.step - first.step);
  }
}

/** Seconds left, or null when unknown. From the history's own times when it has them, else the
 * page's observations, else the average since the training started (pessimistic: includes
 * loading the model and the data). */
export function eta(t: TrainingSummary, now: number, observedSecondsPerStep: number | null = null): number | null {
  const { step, maxSteps } = progress(t.metrics);
  if (t.status !== "processing" || !maxSteps || step <= 0) return null;
  const remaining = maxSteps - step;
  const timed = (t.metrics.history ?? []).filter((h) => typeof h.time === "number").slice(-20);
  if (timed.length >= 2) {
    const a = timed[0];
    const b = timed[timed.length - 1];
    if (b.step > a.step) return (remaining * ((b.time as number) - (a.time as number))) / (b.step - a.step);
  }
  if (observedSecondsPerStep !== null && observedSecondsPerStep > 0) return remaining * observedSecondsPerStep;
  const elapsed = runTime(t, now);
  return elapsed === null ? null : (elapsed / step) * remaining;
}

/** A number for a table cell: up to `digits` significant digits, exponent for tiny values. */
export function num(value: unknown, digits = 4): string {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return String(Number(value.toPrecision(digits)));
}

/** The text of a Python string literal as `repr()` writes it ('...' or "...", with escapes). */
export function pyString(literal: string): string {
  const quote = literal[0];
  if ((quote !== "'" && quote !== '"') || literal[literal.length - 1] !== quote) return literal;
  const body = literal.slice(1, -1);
  const simple: Record<string, string> = { n: "\n", r: "\r", t: "\t", "\\": "\\", "'": "'", '"': '"', "0": "\0" };
  return body.replace(/\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)/g, (whole, esc: string) => {
    if (esc.length > 1) return String.fromCodePoint(parseInt(esc.slice(1), 16));
    return simple[esc] ?? whole;
  });
}

export interface Sample {
  step: number;
  output: string;
}

/** The validation_prompt's generations, from the worker's "sample at step N: '...'" log lines. */
export function samples(logs: string): Sample[] {
  const out: Sample[] = [];
  for (const match of logs.matchAll(/^sample at step (\d+): (.*)$/gm)) {
    const sample = { step: Number(match[1]), output: pyString(match[2]) };
    const last = out[out.length - 1];
    // The final validation repeats the last step's sample when it fell on a validation step.
    if (!last || last.step !== sample.step || last.output !== sample.output) out.push(sample);
  }
  return out;
}

export interface DataSummary {
  train_rows: number;
  validation_rows: number;
  tokens: number;
  trained_tokens: number;
  sequences: number;
  padding: number;
  packing_fill: number | null;
  truncated: number;
}

/** The data check's numbers, from the worker's "data: ..." log line (the last one, if resumed). */
export function dataSummary(logs: string): DataSummary | null {
  const re =
    /^data: (\d+) train rows, (\d+) validation rows, (\d+) tokens \((\d+) trained\), (\d+) sequences, padding ([\d.]+)%(?:, packing fill ([\d.]+)%)?, (\d+) truncated$/gm;
  let last: RegExpMatchArray | null = null;
  for (const match of logs.matchAll(re)) last = match;
  if (!last) return null;
  return {
    train_rows: Number(last[1]),
    validation_rows: Number(last[2]),
    tokens: Number(last[3]),
    trained_tokens: Number(last[4]),
    sequences: Number(last[5]),
    padding: Number(last[6]) / 100,
    packing_fill: last[7] === undefined ? null : Number(last[7]) / 100,
    truncated: Number(last[8]),
  };
}

/** The same from the `data` event's statistics, where the worker keeps them in metrics.data. */
export function dataFromStats(stats: unknown): DataSummary | null {
  if (!stats || typeof stats !== "object") return null;
  const s = stats as Record<string, unknown>;
  const n = (key: string) => (typeof s[key] === "number" ? (s[key] as number) : NaN);
  const summary = {
    train_rows: n("train_rows"),
    validation_rows: n("validation_rows"),
    tokens: n("train_tokens"),
    trained_tokens: n("trained_tokens"),
    sequences: n("sequences"),
    padding: n("padding_fraction"),
    packing_fill: typeof s.packing_fill === "number" ? s.packing_fill : null,
    truncated: n("rows_truncated"),
  };
  return Number.isNaN(summary.train_rows) ? null : summary;
}

export interface EvalRow {
  metric: string;
  base: number | null;
  tuned: number | null;
  change: number | null;
}

/** metrics.eval ({base: {...}, tuned: {...}}) as table rows, metrics in a stable order. */
export function evalRows(evaluation: Metrics["eval"]): EvalRow[] {
  if (!evaluation) return [];
  const base = evaluation.base ?? {};
  const tuned = evaluation.tuned ?? {};
  const names = [...new Set([...Object.keys(tuned), ...Object.keys(base)])];
  return names
    .filter((name) => typeof (tuned[name] ?? base[name]) === "number")
    .map((metric) => {
      const b = typeof base[metric] === "number" ? (base[metric] as number) : null;
      const t = typeof tuned[metric] === "number" ? (tuned[metric] as number) : null;
      return { metric, base: b, tuned: t, change: b !== null && t !== null ? t - b : null };
    });
}

/** The chart series of a history: x = steps, then one array per key (null where absent). */
export function series(history: HistoryPoint[] | undefined, keys: (keyof HistoryPoint)[]): (number | null)[][] {
  const points = [...(history ?? [])].sort((a, b) => a.step - b.step);
  return [
    points.map((p) => p.step),
    ...keys.map((key) => points.map((p) => (typeof p[key] === "number" ? (p[key] as number) : null))),
  ];
}

export interface Field {
  name: string;
  kind: "integer" | "number" | "boolean" | "string" | "enum";
  options: string[];
  default: unknown;
  description: string;
  nullable: boolean;
  required: boolean;
  min?: number;
  max?: number;
}

/** The form fields of an object schema (a version's TrainingInput or Input), in schema order
 * (or by `x-order` where given). */
export function fields(schema: JsonSchema | undefined): Field[] {
  const props = Object.entries(schema?.properties ?? {});
  props.sort(([, a], [, b]) => (a["x-order"] ?? 0) - (b["x-order"] ?? 0));
  return props.map(([name, prop]) => {
    const branches = prop.anyOf ?? [prop];
    const main = branches.find((b) => b.type !== "null") ?? prop;
    const nullable = branches.some((b) => b.type === "null");
    const kind = main.enum ? "enum" : ((main.type ?? "string") as Field["kind"]);
    return {
      name,
      kind,
      options: (main.enum ?? []).map(String),
      default: prop.default,
      description: prop.description ?? main.description ?? "",
      nullable,
      required: (schema?.required ?? []).includes(name),
      min: main.minimum ?? main.exclusiveMinimum,
      max: main.maximum ?? main.exclusiveMaximum,
    };
  });
}

/** A form value as the field's type; undefined for an empty optional field. Throws on a
 * value that is not of the type (the message names the field). */
export function parseValue(field: Field, raw: string | boolean): unknown {
  if (field.kind === "boolean") return Boolean(raw);
  const text = String(raw).trim();
  if (text === "") return undefined;
  if (field.kind === "integer") {
    if (!/^-?\d+$/.test(text)) throw new Error(`${field.name}: must be a whole number`);
    return Number(text);
  }
  if (field.kind === "number") {
    const value = Number(text);
    if (!Number.isFinite(value)) throw new Error(`${field.name}: must be a number`);
    return value;
  }
  return text;
}
