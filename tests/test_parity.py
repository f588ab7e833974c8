"""Every case of the parity fixture (the original implementation's answers) through generate.py's main(): greedy and
beam search (cases.yaml), the paper's seeded beam sampling and beam search at the length limit
(cases_paper_decoding.yaml; a case's `seed` is --seed)."""
import pytest

import generate
from conftest import FIXTURE, fixture_cases, fixture_config, read_jsonl

CASES = fixture_cases() + fixture_cases("cases_paper_decoding.yaml")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_case_matches_original(case, tmp_path, in_fixture):
    import yaml

    cfg = fixture_config(**case["set"])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    output = tmp_path / "answers.jsonl"
    status = generate.main(["--config", str(cfg_path), "--output_path", str(output), "--device", "cpu",
                            "--seed", str(case.get("seed", 42))])
    assert status == 0
    # Byte-identical: same order, same JSON escaping as the original's json.dumps.
    assert output.read_bytes() == (FIXTURE / case["expected"]).read_bytes()
    assert [r["index"] for r in read_jsonl(output)] == [r["index"] for r in read_jsonl(FIXTURE / case["expected"])]
