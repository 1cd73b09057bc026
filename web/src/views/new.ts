import { allModels, api, ApiError, FileCheck, FileObject, Model, owner, Training } from "../api";
import { fill, go, h, View } from "../dom";
import { Field, fields, num, parseValue } from "../format";
import { card, errorBox, fieldInput, FieldInput, lineError, message } from "../widgets";

/** Replicate's own training inputs come first in the spec; the rest go under "More options". */
const LAST_COMMON_INPUT = "lora_dropout";
/** Inputs that take a file: chosen with an upload instead of typed. */
const FILE_INPUTS = ["train_data", "validation_data"];
const NEW_MODEL = "__new__";

interface Upload {
  el: HTMLElement;
  status: HTMLElement;
  file: FileObject | null;
  check: FileCheck | null;
  busy: boolean;
}

/** Pick a base, upload and check the data, set the inputs (the base version's own TrainingInput
 * schema: its defaults and descriptions), pick or create the destination, and start. */
export function newTrainingView(): View {
  const top = h("div");
  const form = h("form", { class: "new-training", novalidate: true });
  const el = h("div", { class: "page" }, h("div", { class: "page-head" }, h("h1", null, "New training")), top, form);
  const me = owner();
  let bases: Model[] = [];
  let inputs: FieldInput[] = [];

  const baseSelect = h("select", { id: "base", name: "base" });
  const destSelect = h("select", { id: "destination", name: "destination" });
  const destName = h("input", { type: "text", id: "destination-name", placeholder: "model name, e.g. bookings", pattern: "[a-z0-9][a-z0-9._\\-]*" });
  const destNew = h("div", { class: "inline", hidden: true }, h("span", { class: "muted" }, `${me}/`), destName);
  const destError = h("div", { class: "field-error", role: "alert" });
  const inputsBox = h("div");
  const submitError = h("div");
  const submit = h("button", { type: "submit", class: "primary", id: "start" }, "Start training");
  const uploads: Record<string, Upload> = {};

  const upload = (name: string, label: string, help: string): Upload => {
    const status = h("div", { class: "file-status", "data-file-status": name });
    const input = h("input", { type: "file", id: `file-${name}`, name, accept: ".jsonl,.json,application/jsonl,text/plain" });
    const u: Upload = { el: h("div", { class: "field file", "data-field": name }, h("label", { for: `file-${name}` }, label), input, h("div", { class: "help" }, help), status), status, file: null, check: null, busy: false };
    input.addEventListener("change", async () => {
      u.file = null;
      u.check = null;
      const chosen = input.files?.[0];
      if (!chosen) return fill(status);
      u.busy = true;
      fill(status, h("span", { class: "muted" }, `uploading ${chosen.name}…`));
      try {
        u.file = await api.upload(chosen);
        fill(status, h("span", { class: "muted" }, "checking every line…"));
        u.check = await api.get<FileCheck>(`/v1/files/${u.file.id}/check`);
        showCheck(u);
      } catch (err) {
        fill(status, errorBox(err));
      } finally {
        u.busy = false;
        checkSplit();
      }
    });
    uploads[name] = u;
    return u;
  };

  const showCheck = (u: Upload) => {
    const c = u.check as FileCheck;
    if (c.valid) {
      fill(u.status, h("div", { class: "ok", "data-valid": "true" }, `✓ ${num(c.rows)} ${c.format?.replace("_", "/")} rows, every line valid`));
    } else {
      const more = c.errors_total > c.errors.length ? h("li", { class: "muted" }, `… and ${c.errors_total - c.errors.length} more`) : null;
      fill(
        u.status,
        h("div", { class: "bad", "data-valid": "false" }, `✗ ${c.detail.split("\n")[0]}`),
        h("ul", { class: "line-errors" }, c.errors.slice(0, 100).map(lineError), more),
      );
    }
  };

  /** The one data problem the check cannot see alone: validation rows taken from a file too short. */
  const checkSplit = () => {
    const row = inputs.find((i) => i.field.name === "num_validation_samples");
    const run = inputs.find((i) => i.field.name === "run_validation");
    const rows = uploads.train_data?.check?.rows;
    if (!row) return;
    const n = Number(row.raw());
    row.error.textContent =
      rows && !uploads.validation_data?.file && (run?.raw() ?? true) && n >= rows
        ? `${n} validation rows from a ${rows}-row file leave none to train on: lower it, or upload validation data`
        : "";
  };

  const renderInputs = () => {
    const base = bases.find((b) => `${b.owner}/${b.name}` === baseSelect.value);
    const schema = base?.latest_version?.openapi_schema.components.schemas.TrainingInput;
    const all: Field[] = fields(schema);
    inputs = all.filter((f) => !FILE_INPUTS.includes(f.name)).map((f) => fieldInput(f));
    const cut = inputs.findIndex((i) => i.field.name === LAST_COMMON_INPUT) + 1 || inputs.length;
    inputs.forEach((i) => i.input.addEventListener("input", checkSplit));
    fill(
      inputsBox,
      card("Inputs", h("div", { class: "grid" }, inputs.slice(0, cut).map((i) => i.row))),
      cut < inputs.length ? h("details", { class: "card more" }, h("summary", null, "More options"), h("div", { class: "grid" }, inputs.slice(cut).map((i) => i.row))) : null,
    );
    checkSplit();
  };

  const start = async (event: Event) => {
    event.preventDefault();
    fill(submitError);
    inputs.forEach((i) => (i.error.textContent = ""));
    destError.textContent = "";
    const base = bases.find((b) => `${b.owner}/${b.name}` === baseSelect.value);
    const train = uploads.train_data;
    if (!base?.latest_version) return fill(submitError, errorBox("Pick a base model."));
    if (!train?.file || train.busy) return fill(submitError, errorBox(train?.busy ? "Wait for the upload to finish." : "Upload a JSONL file of training data."));
    if (train.check && !train.check.valid) return fill(submitError, errorBox("Fix the training data's bad lines first (listed under the file)."));
    const input: Record<string, unknown> = { train_data: train.file.urls.get };
    if (uploads.validation_data?.file) input.validation_data = uploads.validation_data.file.urls.get;
    try {
      for (const i of inputs) {
        const value = parseValue(i.field, i.raw());
        // Only what differs from the default is sent: the training records the inputs as given.
        if (value !== undefined && value !== i.field.default) input[i.field.name] = value;
      }
    } catch (err) {
      return fill(submitError, errorBox(err));
    }
    submit.disabled = true;
    try {
      let destination = destSelect.value;
      if (destination === NEW_MODEL) {
        const name = destName.value.trim();
        if (!name) throw new ApiError(422, "Name the new destination model.", [{ field: "destination", reason: "required" }]);
        await api.post("/v1/models", { owner: me, name, visibility: "private", hardware: "cpu" });
        destination = `${me}/${name}`;
        await loadDestinations(destination);
      }
      const training = await api.post<Training>(
        `/v1/models/${base.owner}/${base.name}/versions/${base.latest_version.id}/trainings`,
        { destination, input },
      );
      go(`#/trainings/${training.id}`);
    } catch (err) {
      showErrors(err);
    } finally {
      submit.disabled = false;
    }
  };

  const showErrors = (err: unknown) => {
    fill(submitError, errorBox(err));
    if (!(err instanceof ApiError)) return;
    for (const e of err.errors) {
      const target = inputs.find((i) => i.field.name === e.field);
      if (target) target.error.textContent = e.reason;
      else if (e.field === "destination" || e.field === "name" || e.field === "owner") destError.textContent = e.reason;
      if (e.line === undefined || e.line === null) continue;
      const file = Object.values(uploads).find((u) => u.file?.name === e.file) ?? uploads.train_data;
      file.status.append(h("ul", { class: "line-errors" }, lineError(e)));
    }
  };

  const loadDestinations = async (selected?: string) => {
    const mine = (await allModels()).filter((m) => m.owner === me && !m.is_official);
    fill(
      destSelect,
      mine.map((m) => h("option", { value: `${m.owner}/${m.name}`, selected: `${m.owner}/${m.name}` === selected }, `${m.owner}/${m.name}`)),
      h("option", { value: NEW_MODEL, selected: !mine.length && !selected }, "+ Create a new model…"),
    );
    destNew.hidden = destSelect.value !== NEW_MODEL;
  };

  destSelect.addEventListener("change", () => {
    destNew.hidden = destSelect.value !== NEW_MODEL;
    if (!destNew.hidden) destName.focus();
  });
  baseSelect.addEventListener("change", renderInputs);
  form.addEventListener("submit", start);

  (async () => {
    try {
      const models = await allModels();
      bases = models.filter((m) => m.is_official && m.latest_version);
      fill(baseSelect, bases.map((b) => h("option", { value: `${b.owner}/${b.name}` }, `${b.owner}/${b.name}${b.description ? ` — ${b.description}` : ""}`)));
      await loadDestinations();
      const spec = fields(bases[0]?.latest_version?.openapi_schema.components.schemas.TrainingInput);
      const describe = (name: string) => spec.find((f) => f.name === name)?.description ?? "";
      const dataCard = card(
        "Training data",
        h(
          "div",
          { class: "grid" },
          upload("train_data", "train_data", describe("train_data")).el,
          upload("validation_data", "validation_data (optional)", describe("validation_data")).el,
        ),
      );
      fill(
        form,
        card(
          "Model",
          h(
            "div",
            { class: "grid" },
            h("div", { class: "field", "data-field": "base" }, h("label", { for: "base" }, "base model"), baseSelect, h("div", { class: "help" }, "The model to fine-tune (GET /v1/models, owner tunery).")),
            h("div", { class: "field", "data-field": "destination" }, h("label", { for: "destination" }, "destination"), destSelect, destNew, h("div", { class: "help" }, "Your model that receives the trained version."), destError),
          ),
        ),
        dataCard,
        inputsBox,
        h("div", { class: "submit-row" }, submit, submitError),
      );
      renderInputs();
    } catch (err) {
      fill(top, errorBox(`Could not load the models: ${message(err)}`));
    }
  })();
  return { el, destroy() {} };
}
