"""`init_from_teacher`: a student keeping a chosen subset of the teacher's layers
(DistilBERT / Minitron-style), from a `Decoder` or a checkpoint directory."""

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax.models import DecoderConfig, from_pretrained, init_decoder, save_pretrained
from kdjax.models.student_init import init_from_teacher
from kdjax.sharding import logical_to_spec, make_mesh, variable_logical_axes
from tests.models.test_checkpoint import _same_params
from tests.tolerances import assert_close

CONFIG = DecoderConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=5,
                       num_heads=4, num_kv_heads=2, attention_bias=True,
                       attention_out_bias=True, bos_token_id=1, eos_token_id=2)
KEEP = [0, 2, 4]


@pytest.fixture(scope="module")
def teacher():
    return init_decoder(CONFIG, seed=3)


@pytest.fixture(scope="module")
def teacher_dir(teacher, tmp_path_factory):
    return save_pretrained(teacher, tmp_path_factory.mktemp("teacher"))


def _flat(model):
    return {p: np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_kept_layers_are_the_teachers_chosen_layers(teacher):
    student = init_from_teacher(teacher, KEEP)
    assert student.config == CONFIG.replace(num_layers=3)
    want, got = _flat(teacher), _flat(student)
    assert want.keys() == got.keys()
    for path in want:
        expected = want[path][np.asarray(KEEP)] if path[0] == "layers" else want[path]
        np.testing.assert_array_equal(got[path], expected, err_msg=str(path))
    # the student owns its buffers (training it never touches the teacher)
    assert (student.embed[...].unsafe_buffer_pointer()
            != teacher.embed[...].unsafe_buffer_pointer())


def test_from_a_directory_reads_only_the_kept_layers(teacher, teacher_dir):
    _same_params(init_from_teacher(teacher_dir, KEEP), init_from_teacher(teacher, KEEP))
    _same_params(init_from_teacher(str(teacher_dir), [1]), init_from_teacher(teacher, [1]))


def test_keeping_every_layer_gives_the_teachers_logits(teacher, rng):
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 9)).astype(np.int32)
    student = init_from_teacher(teacher, range(CONFIG.num_layers))
    np.testing.assert_array_equal(np.asarray(student(tokens).logits),
                                  np.asarray(teacher(tokens).logits))


def test_student_round_trips_through_transformers(teacher, tmp_path, rng):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    student = init_from_teacher(teacher, [1, 4])
    save_pretrained(student, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).double().eval()
    assert hf.config.num_hidden_layers == 2
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 9)).astype(np.int32)
    with torch.no_grad():
        expected = hf(torch.as_tensor(tokens)).logits.numpy()
    assert_close(student(tokens).logits, expected, rtol=0, atol=1e-4)
    _same_params(from_pretrained(tmp_path), student)


def test_overrides_and_mesh(teacher_dir):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    student = init_from_teacher(teacher_dir, KEEP, mesh=mesh, param_dtype="bfloat16",
                                remat="full")
    assert student.config.remat == "full" and student.config.num_layers == 3
    for path, var in nnx.to_flat_state(nnx.state(student, nnx.Param)):
        value = var.get_value()
        assert value.dtype == jax.numpy.bfloat16, path
        assert value.sharding.spec == logical_to_spec(variable_logical_axes(var),
                                                      mesh=mesh), path
    from_decoder = init_from_teacher(from_pretrained(teacher_dir), KEEP, mesh=mesh,
                                     param_dtype="bfloat16")
    _same_params(student, from_decoder)


@pytest.mark.parametrize("keep, message", [
    ([], "keeps no layer"),
    ([0, 5], "contains 5, outside \\[0, 5\\)"),
    ([-1], "contains -1"),
    ([0, 2, 2], "strictly increasing \\(2 is followed by 2\\)"),
    ([3, 1], "strictly increasing"),
    ([0, 1.5], "contains 1.5, not an int"),
    ([True], "not an int"),
    ("0,2", "must be a list of layer indices"),
])
def test_bad_keep_layers_are_named(teacher, teacher_dir, keep, message):
    with pytest.raises(ValueError, match=message):
        init_from_teacher(teacher, keep)
    with pytest.raises(ValueError, match=message):
        init_from_teacher(teacher_dir, keep)


def test_overrides_that_change_the_structure_are_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="num_layers=2 cannot be overridden"):
        init_from_teacher(teacher, KEEP, num_layers=2)
    with pytest.raises(ValueError, match="must keep the parameter shapes"):
        init_from_teacher(teacher, KEEP, intermediate_size=64)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        init_from_teacher(tmp_path, KEEP)
