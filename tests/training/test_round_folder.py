"""A round folder as the save step leaves it, with real (tiny) models and no training: the library model cards plus
ours, and a run folder that still loads and searches after it is moved (issue #13 part 5)."""

import shutil

import pytest

from expandr_haystack.training.config import JointConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """run/round_1/{encoder (the bundled encoder saved by sentence-transformers), adapter (a fresh LoRA adapter of
    the bundled LLM saved by PEFT)}, then the real save step (pipeline.yaml and model cards)."""
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    from expandr_haystack.models import resolve_encoder_path, resolve_llm_path
    from expandr_haystack.training.rounds import JointTrainer

    run = tmp_path_factory.mktemp("saved") / "run"
    r1 = run / "round_1"
    SentenceTransformer(resolve_encoder_path(None), device="cpu").save(str(r1 / "encoder"))
    llm = AutoModelForCausalLM.from_pretrained(resolve_llm_path(None))
    get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(
        str(r1 / "adapter"))
    config = JointConfig.from_dict({"rounds": 1, "expansion": {"max_new_tokens": 4}})
    trainer = JointTrainer(config, run, progress_bar=False)
    trainer.folder.open(config.to_dict(), resume=False, defaults=JointConfig.defaults())
    trainer.folder.finish("round1.retriever", examples=5)
    trainer.folder.finish("round1.dpo", pairs=2)
    trainer.folder.finish("round1.eval", settings={"query_weight": {"expand": 0.8}})
    trainer.folder.metrics = [{"round": 1, "label": "round 1: encoder_1 + LLM_1", "method": "expand",
                               "ndcg@10": 0.5, "recall@100": 0.9}]
    trainer._save(1)
    return run


def test_round_models_carry_the_library_cards_and_ours(saved_run):
    from expandr_haystack.training.cards import BEGIN

    encoder = (saved_run / "round_1" / "encoder" / "README.md").read_text()
    adapter = (saved_run / "round_1" / "adapter" / "README.md").read_text()
    assert "sentence-transformers" in encoder.split(BEGIN)[0] and "round 1 encoder" in encoder
    assert "peft" in adapter.split(BEGIN)[0].lower() and "round 1 adapter" in adapter
    assert "w = 0.8" in encoder and "(2 pairs)" in adapter and "| expand | 50.00 |" in encoder


def test_a_moved_run_folder_loads_and_searches(saved_run, tmp_path):
    from haystack import Document
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder,
    )

    from expandr_haystack.training import load_round_pipeline

    moved = tmp_path / "copied" / "another-name"
    shutil.copytree(saved_run, tmp_path / "kept")  # the module's folder stays for the other test
    shutil.move(str(tmp_path / "kept"), str(moved))
    pipeline = load_round_pipeline(moved / "round_1" / "pipeline.yaml")
    retriever, expander = pipeline.get_component("retriever"), pipeline.get_component("expander")
    assert retriever.model == str((moved / "round_1" / "encoder").resolve())
    assert expander.adapter == str((moved / "round_1" / "adapter").resolve()) and retriever.fusion.query_weight == 0.8

    embedder = SentenceTransformersDocumentEmbedder(model=retriever.model, local_files_only=True, progress_bar=False)
    embedder.warm_up()
    docs = [Document(id="wing", content="lift of an aircraft wing at high angles of attack"),
            Document(id="heat", content="heat transfer in laminar boundary layers"),
            Document(id="shell", content="buckling of thin cylindrical shells under pressure")]
    retriever.document_store.write_documents(embedder.run(docs)["documents"])
    result = pipeline.run({"expander": {"query": "wing lift"}})
    assert result["retriever"]["documents"][0].id == "wing"
    assert (moved / "cache.sqlite").exists() and not (saved_run / "cache.sqlite").exists()
