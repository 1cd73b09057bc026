import { describe, expect, it } from "vitest";
import type { Training } from "../src/api";
import { dataFromStats, dataSummary, duration, eta, evalRows, fields, parseValue, progress, pyString, samples, series, StepClock } from "../src/format";

const training = (over: Partial<Training>): Training => ({
  id: "t1", model: "tunery/tiny", version: "v", destination: "alice/x", status: "processing", input: {},
  output: null, error: null, logs: "", metrics: {}, created_at: null, started_at: null, completed_at: null, ...over,
});

describe("duration", () => {
  it("reads like a clock", () => {
    expect(duration(9.6)).toBe("10s");
    expect(duration(65)).toBe("1m 05s");
    expect(duration(3 * 3600 + 7 * 60)).toBe("3h 07m");
    expect(duration(null)).toBe("–");
  });
});

describe("pyString", () => {
  it("undoes repr() of a str", () => {
    expect(pyString("'a cat'")).toBe("a cat");
    expect(pyString(`"it's"`)).toBe("it's");
    expect(pyString("'line\\nnext \\'q\\' \\\\ \\x41\\u00e9\\U0001F600'")).toBe("line\nnext 'q' \\ Aé😀");
  });
});

describe("log parsing", () => {
  const logs = [
    "data: 20 train rows, 4 validation rows, 480 tokens (60 trained), 20 sequences, padding 35.0%, 0 truncated",
    "step 1/3 loss 10.1234 lr 1.00e-04 50.0 tok/s",
    "sample at step 2: ' dog\\n'",
    "sample at step 3: \"owl's\"",
    "sample at step 3: \"owl's\"",
    "data: 20 train rows, 4 validation rows, 480 tokens (60 trained), 6 sequences, padding 2.5%, packing fill 91.3%, 1 truncated",
  ].join("\n");

  it("finds the validation samples", () => {
    expect(samples(logs)).toEqual([{ step: 2, output: " dog\n" }, { step: 3, output: "owl's" }]);
  });

  it("reads the last data summary, packing fill optional", () => {
    expect(dataSummary(logs)).toEqual({
      train_rows: 20, validation_rows: 4, tokens: 480, trained_tokens: 60, sequences: 6,
      padding: 0.025, packing_fill: expect.closeTo(0.913, 6), truncated: 1,
    });
    expect(dataSummary(logs.split("\n")[0])?.packing_fill).toBeNull();
    expect(dataSummary("nothing")).toBeNull();
  });

  it("prefers the data event's own statistics when metrics carry them", () => {
    const stats = { train_rows: 20, validation_rows: 4, train_tokens: 480, trained_tokens: 60, sequences: 6,
      padding_fraction: 0.025, packing_fill: null, rows_truncated: 0 };
    expect(dataFromStats(stats)).toMatchObject({ tokens: 480, padding: 0.025, packing_fill: null, truncated: 0 });
    expect(dataFromStats(undefined)).toBeNull();
  });
});

describe("progress and ETA", () => {
  it("is step over max_steps", () => {
    expect(progress({ step: 3, max_steps: 12 })).toEqual({ step: 3, maxSteps: 12, fraction: 0.25 });
    expect(progress({}, "succeeded").fraction).toBe(1);
    expect(progress({ step: 2, max_steps: -1 }).maxSteps).toBeNull();
  });

  it("uses the history's clock, then the page's, then the average since start", () => {
    const now = 1000;
    const started_at = new Date((now - 100) * 1000).toISOString();
    const metrics = { step: 10, max_steps: 30 };
    expect(eta(training({ metrics, started_at }), now)).toBeCloseTo(200);
    expect(eta(training({ metrics, started_at }), now, 2)).toBeCloseTo(40);
    const history = [{ step: 8, time: 500 }, { step: 10, time: 501 }];
    expect(eta(training({ metrics: { ...metrics, history }, started_at }), now, 2)).toBeCloseTo(10);
    expect(eta(training({ metrics, started_at, status: "succeeded" }), now)).toBeNull();
  });

  it("measures seconds per step from what it saw change", () => {
    const clock = new StepClock();
    clock.observe("t", 1, 0);
    clock.observe("t", 2, 10);
    expect(clock.secondsPerStep("t")).toBeNull();
    clock.observe("t", 2, 12);
    clock.observe("t", 4, 14);
    expect(clock.secondsPerStep("t")).toBeCloseTo(2);
  });
});

describe("tables and series", () => {
  it("lines up base and tuned", () => {
    expect(evalRows({ base: { loss: 2, exact_match: 0 }, tuned: { loss: 0.5, exact_match: 0.9 } })).toEqual([
      { metric: "loss", base: 2, tuned: 0.5, change: -1.5 },
      { metric: "exact_match", base: 0, tuned: 0.9, change: 0.9 },
    ]);
    expect(evalRows(undefined)).toEqual([]);
  });

  it("aligns sparse values on steps", () => {
    const history = [{ step: 2, loss: 1.5, val_loss: 1.7 }, { step: 1, loss: 2 }];
    expect(series(history, ["loss", "val_loss"])).toEqual([[1, 2], [2, 1.5], [null, 1.7]]);
  });
});

describe("schema fields", () => {
  const schema = {
    required: ["train_data"],
    properties: {
      train_data: { type: "string", description: "URL" },
      num_train_epochs: { type: "integer", default: 3, minimum: 1, description: "Epochs" },
      eval_steps: { anyOf: [{ type: "integer", minimum: 1 }, { type: "null" }], default: null },
      peft_method: { type: "string", enum: ["lora", "qlora", "full"], default: "lora" },
      run_validation: { type: "boolean", default: true },
    },
  };

  it("describes each input", () => {
    const f = fields(schema);
    expect(f.map((x) => [x.name, x.kind, x.nullable, x.required])).toEqual([
      ["train_data", "string", false, true],
      ["num_train_epochs", "integer", false, false],
      ["eval_steps", "integer", true, false],
      ["peft_method", "enum", false, false],
      ["run_validation", "boolean", false, false],
    ]);
    expect(f[1]).toMatchObject({ default: 3, min: 1, description: "Epochs" });
    expect(f[3].options).toEqual(["lora", "qlora", "full"]);
  });

  it("parses form values by type", () => {
    const [, epochs, evalSteps] = fields(schema);
    expect(parseValue(epochs, " 5 ")).toBe(5);
    expect(parseValue(evalSteps, "")).toBeUndefined();
    expect(() => parseValue(epochs, "2.5")).toThrow(/num_train_epochs/);
  });
});
