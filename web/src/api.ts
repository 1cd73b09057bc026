// The /v1 API with the signed-in token: the dashboard sees exactly what a client with that
// token sees. The token lives in sessionStorage only (gone when the tab closes).

import { SseEvent, SseParser } from "./sse";

const TOKEN_KEY = "tunery.token";
const OWNER_KEY = "tunery.owner";

export interface LineError {
  file?: string | null;
  line?: number | null;
  field?: string | null;
  reason: string;
}

export interface Version {
  id: string;
  created_at: string | null;
  openapi_schema: { components: { schemas: Record<string, JsonSchema> } };
}

export interface Model {
  owner: string;
  name: string;
  description: string | null;
  is_official: boolean;
  latest_version: Version | null;
}

export interface Training {
  id: string;
  model: string;
  version: string;
  destination: string;
  status: Status;
  paused?: boolean; // paused through OpenAI's jobs API (status stays "starting", as Replicate has no paused)
  input: Record<string, unknown>;
  output: { weights?: string; version?: string } | null;
  error: string | null;
  logs: string;
  metrics: Metrics;
  created_at: string | null;
  started_at: string | null;
  completed_at: string | null;
}

/** A training as a list with view=summary gives it: no logs, recent metric history only. */
export type TrainingSummary = Omit<Training, "logs">;

export interface Prediction {
  id: string;
  status: Status;
  output: string[] | null;
  error: string | null;
  metrics: Record<string, number>;
}

export interface FileObject {
  id: string;
  name: string;
  size: number;
  urls: { get: string; download: string };
}

export interface FileCheck {
  valid: boolean;
  format: string | null;
  rows: number | null;
  detail: string;
  errors: LineError[];
  errors_total: number;
}

export type Status = "starting" | "processing" | "succeeded" | "failed" | "canceled";
export const TERMINAL: Status[] = ["succeeded", "failed", "canceled"];

export interface HistoryPoint {
  step: number;
  loss?: number;
  val_loss?: number;
  learning_rate?: number;
  tokens_per_second?: number;
  time?: number;
  /** Supervised runs: the share of labelled next tokens the model ranked first (mean token accuracy). */
  token_accuracy?: number;
  val_token_accuracy?: number;
  /** DPO runs: the fraction of pairs whose preferred answer has the higher reward, and the mean gap. */
  reward_accuracy?: number;
  reward_margin?: number;
  val_reward_accuracy?: number;
  val_reward_margin?: number;
  /** GRPO runs: the grader's mean score and spread over a step's answers, the share of prompts whose
   * answers all scored alike, the answers' mean length, and each named grader's score (grader_<name>). */
  reward_mean?: number;
  reward_std?: number;
  no_spread_share?: number;
  completion_length?: number;
  val_reward_mean?: number;
  [grader: `grader_${string}`]: number | undefined;
}

export interface Metrics {
  step?: number;
  max_steps?: number;
  loss?: number;
  val_loss?: number | null;
  learning_rate?: number;
  tokens_per_second?: number;
  history?: HistoryPoint[];
  eval?: Record<string, Record<string, number | null>>;
  [key: string]: unknown;
}

export interface JsonSchema {
  type?: string;
  title?: string;
  description?: string;
  default?: unknown;
  enum?: unknown[];
  anyOf?: JsonSchema[];
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
  properties?: Record<string, JsonSchema>;
  required?: string[];
  "x-order"?: number;
}

export interface Page<T> {
  next: string | null;
  results: T[];
}

/** A problem answer (RFC 7807) of the API. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly errors: LineError[] = [],
  ) {
    super(message);
  }
}

export function token(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function owner(): string {
  return sessionStorage.getItem(OWNER_KEY) ?? "";
}

export function signOut(): void {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(OWNER_KEY);
}

/** Check `candidate` with GET /v1/account; keep it (and the owner's name) if it is accepted. */
export async function signIn(candidate: string): Promise<string> {
  const account = await request<{ username: string }>("/v1/account", {}, candidate.trim());
  sessionStorage.setItem(TOKEN_KEY, candidate.trim());
  sessionStorage.setItem(OWNER_KEY, account.username);
  return account.username;
}

/** The path (and query) of an API URL: the server builds absolute URLs on its public URL, but the
 * page always talks to the origin it was loaded from. */
export function localPath(url: string): string {
  const parsed = new URL(url, location.href);
  return parsed.pathname + parsed.search;
}

interface Options {
  method?: string;
  json?: unknown;
  form?: FormData;
  signal?: AbortSignal;
  headers?: Record<string, string>;
}

async function send(path: string, opts: Options, auth: string | null): Promise<Response> {
  const headers: Record<string, string> = { ...opts.headers };
  if (auth) headers.Authorization = `Bearer ${auth}`;
  let body: BodyInit | undefined;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  } else if (opts.form) {
    body = opts.form;
  }
  const response = await fetch(localPath(path), { method: opts.method ?? "GET", headers, body, signal: opts.signal });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    let errors: LineError[] = [];
    try {
      const problem = await response.json();
      detail = problem.detail ?? problem.title ?? detail;
      errors = problem.errors ?? [];
    } catch {
      // not a problem document: keep the status line
    }
    if (response.status === 401 && auth === token()) {
      signOut();
      window.dispatchEvent(new Event("tunery:signed-out"));
    }
    throw new ApiError(response.status, detail, errors);
  }
  return response;
}

async function request<T>(path: string, opts: Options = {}, auth: string | null = token()): Promise<T> {
  const response = await send(path, opts, auth);
  return (response.status === 204 ? null : await response.json()) as T;
}

/** How long a read may take before it is given up (a poll that never answered would stop the
 * page's live updates: `every` waits for each run before it schedules the next). */
export const GET_TIMEOUT_MS = 30_000;

export const api = {
  get: <T>(path: string, signal: AbortSignal = AbortSignal.timeout(GET_TIMEOUT_MS)) => request<T>(path, { signal }),
  post: <T>(path: string, json?: unknown, headers?: Record<string, string>) =>
    request<T>(path, { method: "POST", json: json ?? {}, headers }),
  upload: (file: File) => {
    const form = new FormData();
    form.append("content", file, file.name);
    return request<FileObject>("/v1/files", { method: "POST", form });
  },
  blob: async (path: string) => (await send(path, {}, token())).blob(),
};

/** Every model the caller can see (own and base), following the pages. */
export async function allModels(): Promise<Model[]> {
  const models: Model[] = [];
  let url: string | null = "/v1/models?limit=1000";
  while (url) {
    const page: Page<Model> = await api.get<Page<Model>>(url);
    models.push(...page.results);
    url = page.next;
  }
  return models;
}

/** A prediction's server-sent events, read with fetch (EventSource cannot send the token). */
export async function* streamEvents(path: string, signal?: AbortSignal): AsyncGenerator<SseEvent> {
  const response = await send(path, { signal, headers: { Accept: "text/event-stream" } }, token());
  if (!response.body) throw new ApiError(0, "the browser gave no response body to stream");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield* parser.feed(value);
    }
    yield* parser.feed("\n\n");
  } finally {
    reader.releaseLock();
  }
}
