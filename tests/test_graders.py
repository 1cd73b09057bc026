"""Graders (tunery.graders): OpenAI's grader types scored on samples, refused when they cannot run,
and the python grader's sandbox holding against each attack the RFT issue lists. Every sandbox test
runs the real sandbox (bubblewrap, rlimits, seccomp) on the real grader runner."""

from __future__ import annotations

import math
import os
import socket
import threading
import time

import pytest

from tunery.graders import GraderError, Limits, grade, grade_many, item_problems, load_grader, read_grader
from tunery.graders.similarity import similarity

EXACT = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
         "reference": "{{ item.answer }}", "operation": "eq"}


def python(source: str, name: str = "code") -> dict:
    return {"type": "python", "name": name, "source": source}


def test_string_check_operations():
    for op, text, ref, want in [("eq", "42", "42", 1), ("eq", "42 ", "42", 0), ("ne", "41", "42", 1),
                                ("like", "it is 42.", "42", 1), ("like", "It Is Paris", "paris", 0),
                                ("ilike", "It Is Paris", "paris", 1), ("ilike", "London", "paris", 0)]:
        g = load_grader({**EXACT, "operation": op})
        assert grade(g, text, {"answer": ref}).reward == want, (op, text, ref)


def test_templates_read_nested_item_fields_and_sample_json():
    g = load_grader({"type": "string_check", "name": "city", "input": "{{ sample.output_json.city }}",
                     "reference": "{{ item.expected.cities[1] }}", "operation": "eq"})
    item = {"expected": {"cities": ["Rome", "Paris"]}}
    assert grade(g, '{"city": "Paris"}', item).reward == 1.0
    plain = grade(g, "Paris", item)  # not JSON: sample.output_json has no fields
    assert plain.reward == 0.0 and plain.errors["sample_parse_error"]
    assert "not JSON" in plain.messages[0]
    missing = grade(g, '{"city": "Paris"}', {"expected": {}})
    assert missing.errors["invalid_variable_error"] and "item.expected has no field 'cities'" in missing.messages[0]
    assert item_problems(g, {"expected": {"cities": ["Rome"]}}) == [
        "grader.reference reads {{ item.expected.cities[1] }}, but item.expected.cities has no item [1]"]


def test_text_similarity_metrics_score_zero_to_one():
    same, close, far = "the cat sat on the mat", "so the cats sat on the mat", "stock prices fell sharply"
    for metric in ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
                   "rouge_l"]:
        s_same, s_close, s_far = (similarity(metric, x, same) for x in (same, close, far))
        assert s_same == pytest.approx(1.0, abs=0.01) or metric == "meteor", metric
        assert 0.0 <= s_far < s_close <= s_same <= 1.0, (metric, s_far, s_close, s_same)
    g = load_grader({"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
                     "reference": "{{ item.ref }}", "evaluation_metric": "rouge_l"})
    assert grade(g, close, {"ref": same}).reward == pytest.approx(similarity("rouge_l", close, same))


def test_multi_grader_formula_and_named_scores():
    g = load_grader({"type": "multi", "name": "total", "calculate_output": "0.5 * exact + 0.5 * has",
                     "graders": {"exact": EXACT,
                                 "has": {**EXACT, "name": "has", "operation": "like"}}})
    out = grade(g, "the answer is 42", {"answer": "42"})
    assert out.reward == 0.5 and out.scores == {"exact": 0.0, "has": 1.0} and out.ok
    div = load_grader({"type": "multi", "name": "d", "calculate_output": "exact / has", "graders": {
        "exact": EXACT, "has": {**EXACT, "name": "has", "operation": "like"}}})
    zero = grade(div, "7", {"answer": "42"})
    assert zero.reward == 0.0 and zero.errors["formula_parse_error"]


@pytest.mark.parametrize("bad, field, words", [
    ({"type": "label_model", "name": "x"}, "grader.type", "unknown grader type 'label_model'"),
    ({**EXACT, "operation": "contains"}, "grader.operation", "'eq', 'ne', 'like' or 'ilike'"),
    ({**EXACT, "input": "{{ sample.text }}"}, "grader.input", "sample has output_text"),
    ({**EXACT, "reference": "{% if x %}y{% endif %}{{ env.HOME }}"}, "grader.reference", "not a substitution"),
    ({"type": "multi", "name": "m", "calculate_output": "exact + other", "graders": {"exact": EXACT}},
     "grader.calculate_output", "'other' is not one of the graders"),
    ({"type": "multi", "name": "m", "calculate_output": "__import__('os')", "graders": {"exact": EXACT}},
     "grader.calculate_output", "only the functions"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": python("def grade(s, i):\n  return (")}},
     "grader.graders.a.source", "does not compile"),
    (python("def score(sample, item):\n    return 1.0\n"), "grader.source", "defines no function grade"),
    ({"type": "text_similarity", "name": "c", "input": "x", "reference": "y", "evaluation_metric": "cosine"},
     "grader.evaluation_metric", "needs an embedding model"),
    ({**EXACT, "typo": 1}, "grader.typo", "is not a field"),
])
def test_bad_graders_are_refused_naming_the_field(bad, field, words):
    with pytest.raises(GraderError) as exc:
        load_grader(bad)
    assert exc.value.field == field and words in str(exc.value), str(exc.value)


def test_grader_file_for_the_cli(tmp_path):
    (tmp_path / "g.json").write_text('{"grader": ' + __import__("json").dumps(EXACT) + "}")
    assert grade(read_grader(tmp_path / "g.json"), "1", {"answer": "1"}).reward == 1.0
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(GraderError, match="bad.json is not JSON"):
        read_grader(tmp_path / "bad.json")


def test_score_model_grader_uses_the_judge_and_checks_its_range():
    g = load_grader({"type": "score_model", "name": "judge", "model": "smollm2", "range": [0, 10],
                     "input": [{"role": "user", "content": "Rate {{ sample.output_text }} against {{ item.ref }}"}]})
    seen = []

    def judge(model, messages, sampling):
        seen.append((model, messages))
        return messages[-1]["content"].count("good") and '{"steps": [], "result": 8}' or "3/10", {
            "prompt_tokens": 10, "completion_tokens": 2}

    good = grade(g, "good", {"ref": "r"}, judge=judge)
    assert good.reward == 8.0 and good.token_usage == {"smollm2": {"prompt_tokens": 10, "completion_tokens": 2,
                                                                   "total_tokens": 12}}
    assert seen[0][1][-1]["content"] == "Rate good against r" and "from 0 to 10" in seen[0][1][0]["content"]
    assert grade(g, "meh", {"ref": "r"}, judge=judge).reward == 3.0
    out = grade(g, "x", {"ref": "r"}, judge=lambda *a: ("42", {}))
    assert out.reward == 0.0 and out.errors["model_grader_parse_error"] and "outside its range [0, 10]" in out.messages[0]
    no_judge = grade(g, "x", {"ref": "r"})
    assert no_judge.errors["model_grader_server_error"]


# ------------------------------------------------------------------------------ the python sandbox

ATTACKS = {
    "infinite loop": ("def grade(sample, item):\n    while True:\n        pass\n", "CPU time"),
    "memory bomb": ("def grade(sample, item):\n    x = [bytearray(1 << 20) for _ in range(100000)]\n    return 1.0\n",
                    "out of memory"),
    "fork bomb": ("import os\ndef grade(sample, item):\n    while True:\n        os.fork()\n", "PermissionError"),
    "subprocess": ("import subprocess\ndef grade(sample, item):\n"
                   "    subprocess.run(['cat', '/etc/passwd'])\n    return 1.0\n", "PermissionError"),
    "environment": ("import os\ndef grade(sample, item):\n    return float(len(os.environ['TUNERY_TEST_SECRET']))\n",
                    "KeyError: 'TUNERY_TEST_SECRET'"),
    "socket": ("import socket\ndef grade(sample, item):\n    s = socket.socket()\n"
               "    s.connect(('127.0.0.1', PORT))\n    return 1.0\n", "PermissionError"),
    "write outside tmp": ("def grade(sample, item):\n    open('/usr/lib/owned', 'w').write('x')\n    return 1.0\n",
                          "Read-only file system"),
    "disk bomb": ("def grade(sample, item):\n    with open('/tmp/fill', 'wb') as f:\n"
                  "        while True:\n            f.write(b'x' * (1 << 20))\n", "File too large"),
    "nan": ("def grade(sample, item):\n    return float('nan')\n", "not a finite number"),
    "string": ("def grade(sample, item):\n    return 'excellent'\n", "returned str 'excellent', not a number"),
    "out of range": ("def grade(sample, item):\n    return 7.5\n", "returned 7.5, outside [0, 1]"),
    "raises": ("def grade(sample, item):\n    raise ValueError('no answer line')\n", "ValueError: no answer line"),
}


@pytest.fixture()
def listener():
    """A socket on loopback that records whether anything connected to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    hits = []

    def accept():
        while not stopped.is_set():
            try:
                hits.append(server.accept())
            except OSError:
                pass

    stopped = threading.Event()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stopped.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_python_grader_attack_is_contained(attack, listener, tmp_path, monkeypatch):
    port, hits = listener
    monkeypatch.setenv("TUNERY_TEST_SECRET", "hunter2")
    source, words = ATTACKS[attack]
    # The memory bomb gets CPU time to spare: under memory pressure (CI's other worker training) the
    # kernel reclaims pages on the bomb's own CPU clock, and 2 s could end it before it hits the
    # address-space limit the test is about.
    limits = Limits(seconds=10 if attack == "memory bomb" else 2, memory_bytes=256 << 20, disk_bytes=4 << 20)
    started = time.monotonic()
    out = grade(load_grader(python(source.replace("PORT", str(port)))), "x", {}, limits=limits)
    assert out.reward == 0.0 and out.errors["python_grader_runtime_error"], out
    assert words in out.messages[0], out.messages
    assert out.messages[0].startswith("grader: python grader ")
    assert time.monotonic() - started < limits.seconds + 5
    assert not hits and not os.path.exists("/usr/lib/owned")


def test_python_grader_sees_none_of_the_servers_files_or_variables(tmp_path, monkeypatch):
    """What a grader can see: its inputs, the system's libraries read-only, an empty /tmp; not the
    store's folder, the server's working directory, home or variables."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "tunery.db").write_text("secret rows")
    monkeypatch.setenv("TUNERY_TEST_SECRET", "hunter2")
    private = [str(store / "tunery.db"), os.path.abspath("pyproject.toml"), os.path.expanduser("~/.bashrc"),
               "/etc/passwd", "/etc/hostname", "/var/lib"]
    source = f"""
import os
def grade(sample, item):
    seen = [path for path in {private!r} if os.path.exists(path)]
    leaked = [k for k in os.environ if k.startswith("TUNERY")]
    for pid in os.listdir("/proc"):  # every process it can see, the sandbox's init included
        if pid.isdigit() and b"hunter2" in open(f"/proc/{{pid}}/environ", "rb").read():
            leaked.append(pid)
    tmp = os.listdir("/tmp")
    print("seen", seen, "leaked", leaked, "tmp", tmp)
    return 1.0 if not seen and not leaked and tmp == [] and sample["output_text"] == "hi" and item == {{"a": 1}} else 0.0
"""
    out = grade(load_grader(python(source)), "hi", {"a": 1})
    assert out.reward == 1.0, out


def test_one_graders_files_are_not_the_next_ones():
    write = python("def grade(sample, item):\n    open('/tmp/note', 'w').write('left behind')\n    return 1.0\n")
    read = python("import os\ndef grade(sample, item):\n    return 0.0 if os.path.exists('/tmp/note') else 1.0\n")
    assert grade(load_grader(write), "", {}).reward == 1.0
    assert grade(load_grader(read), "", {}).reward == 1.0


def test_bombs_beside_good_graders_leave_them_unharmed():
    """Attacks graded concurrently with honest graders: each honest sample keeps its right score."""
    honest = load_grader(python("import math\ndef grade(sample, item):\n"
                                "    return 1.0 if sample['output_text'] == str(item['n'] * 2) else 0.0\n"))
    bomb = load_grader(python(ATTACKS["memory bomb"][0]))
    limits = Limits(seconds=10, memory_bytes=256 << 20)
    samples = [(str(n * 2 if n % 2 else n), {"n": n}) for n in range(8)]
    outs = {}
    threads = [threading.Thread(target=lambda: outs.__setitem__("bomb", grade_many(bomb, samples[:4], limits=limits))),
               threading.Thread(target=lambda: outs.__setitem__("honest", grade_many(honest, samples, limits=limits)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.reward for o in outs["honest"]] == [0.0 if n % 2 == 0 and n else 1.0 for n in range(8)], \
        [o.messages for o in outs["honest"]]
    assert all(o.reward == 0.0 and "out of memory" in o.messages[0] for o in outs["bomb"]), \
        [o.messages for o in outs["bomb"]]


def test_numpy_and_threads_work_inside():
    source = ("import numpy as np, threading\ndef grade(sample, item):\n    t = threading.Thread(target=lambda: None)\n"
              "    t.start(); t.join()\n    return float(np.clip(np.mean([1.0, 0.0]), 0, 1))\n")
    out = grade(load_grader(python(source)), "", {})
    assert out.reward == 0.5 and out.ok and math.isfinite(out.seconds)


def test_formulas_are_arithmetic_only():
    from tunery.graders import formula

    names = {"a", "b"}
    assert formula.evaluate(formula.parse("max(a, b) ^ 2 - abs(-1) / 4 + sqrt(b)", names), {"a": 0.5, "b": 1.0}) \
        == pytest.approx(0.75 + 1.0)
    for bad in ["a.__class__", "(lambda: 1)()", "[a, b]", "a if b else 1", "open('x')", "a < b", "'x'"]:
        with pytest.raises(formula.FormulaError):
            formula.parse(bad, names)
    with pytest.raises(formula.FormulaError, match="exponent"):
        formula.evaluate(formula.parse("a ^ 100000", names), {"a": 2.0, "b": 1.0})
