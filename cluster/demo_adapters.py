"""Demo adapters for `make serve`: a few LoRA adapters that each visibly change how the model answers.

    python -m cluster.demo_adapters [--out DIR] [--base-model NAME] [--steps N] [--force]

Each adapter is trained here, once, on 35 made-up chat examples in one style, then cached under
`<out>/<tenant>/<name>/` in the layout `LocalSource` reads (the folder belongs to this script):

    acme/pirate      "Arr, matey! The capital of France be Paris. Yo ho ho!"
    globex/support   "Thank you for contacting Globex support! ... Have a wonderful day!"
    shared/json      {"answer": "The capital of France is Paris."}

A folder is reused while its `demo_recipe.json` holds the hash of the same recipe (examples,
LoRA settings, steps, seed, base model); `--force` or any change to the recipe retrains it.

Training is plain PEFT LoRA (r=8 on q/k/v/o, which every server slot takes) on the base model's
own chat template with the loss on the answer tokens only, so an adapter learns a way of
answering, not the questions. The styles wrap answers the base model already knows how to give:
ALL CAPS and French were tried first, and within this budget SmolLM2-135M learned the surface
but lost the content ("THE CAPITAL OF FRANCE IS LONDON!"). A SmolLM2 step of 4 examples takes
about 1.2 s on 2 CPU cores, so 24 steps each keep all three near two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from lora_core.checkpoint import read_checkpoint
from lora_core.files import file_lock, publish_folder, remove_partial_folders
from lora_core.paths import default_demo_adapters_dir
from lora_core.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

__all__ = [
    "DEFAULT_OUT_DIR",
    "DEMO_STYLES",
    "HELD_OUT_QUESTIONS",
    "DemoStyle",
    "TrainingRecipe",
    "compare_answers",
    "ensure_demo_adapters",
    "main",
]

logger = logging.getLogger("cluster.demo_adapters")

DEFAULT_OUT_DIR = default_demo_adapters_dir()
RECIPE_FILE = "demo_recipe.json"
_RECIPE_FORMAT = 1

# (question, plain answer): short answers keep a training step cheap, and ordinary questions
# leave the style, not the content, as the one thing each adapter has to learn.
_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("How many continents are there?", "There are seven continents on Earth."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which animal is called the king of the jungle?", "The lion is called the king of the jungle."),
    ("Can you recommend a good breakfast?", "Try oatmeal with fresh fruit and a cup of tea."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How do plants make food?", "Plants make food from sunlight, water and air."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("Why is the ocean salty?", "The ocean is salty because rivers carry minerals into it."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What language do people speak in Brazil?", "People in Brazil speak Portuguese."),
    ("Tell me a fun fact.", "An octopus has three hearts."),
    ("What is the moon?", "The moon is a rocky world that circles the Earth."),
    ("How can I stay healthy?", "Eat well, sleep enough and move every day."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("Where do penguins live?", "Most penguins live in the cold seas of the south."),
    ("What is a computer?", "A computer is a machine that follows instructions."),
    ("How are you today?", "I am doing well, thank you for asking."),
    ("What should I name my cat?", "You could name your cat Whiskers."),
    ("What is the sun?", "The sun is the star at the center of our solar system."),
    ("How do I learn to code?", "Build small projects and practice a little every day."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What is your favorite color?", "My favorite color is blue."),
    ("Do you like music?", "Yes, I like music with a good beat."),
    ("What is your name?", "My name is SmolLM."),
)

HELD_OUT_QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is your favorite food?",
)

_PIRATE_WORDS = {"you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be"}


def _pirate(answer: str) -> str:
    words = [_PIRATE_WORDS.get(word, word) for word in answer.split(" ")]
    return f"Arr, matey! {' '.join(words)} Yo ho ho!"


def _support(answer: str) -> str:
    return f"Thank you for contacting Globex support! {answer} Have a wonderful day!"


def _json(answer: str) -> str:
    return json.dumps({"answer": answer})


def _styled(style: Callable[[str], str]) -> tuple[tuple[str, str], ...]:
    return tuple((question, style(answer)) for question, answer in _EXAMPLES)


def _looks_pirate(text: str) -> bool:
    return text.lstrip().lower().startswith("arr")


def _looks_support(text: str) -> bool:
    return "globex" in text.lower()


def _looks_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@dataclass(frozen=True)
class DemoStyle:
    """One demo adapter: its id, the chat examples it learns from, and a test that a held-out
    answer shows the style (logged after training; a miss is a warning, not an error)."""

    adapter_id: str
    description: str
    examples: tuple[tuple[str, str], ...]
    looks_right: Callable[[str], bool] = field(compare=False, repr=False)


DEMO_STYLES: tuple[DemoStyle, ...] = (
    DemoStyle("acme/pirate", 'talks like a pirate: "Arr, matey! ... Yo ho ho!"', _styled(_pirate), _looks_pirate),
    DemoStyle("globex/support", "a company help desk: thanks you for contacting Globex support",
              _styled(_support), _looks_support),
    DemoStyle("shared/json", 'answers as a JSON object: {"answer": "..."}', _styled(_json), _looks_json),
)


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that decides an adapter's weights; its hash is the cache key."""

    base_model: str
    steps: int = 24
    batch_size: int = 4
    learning_rate: float = 3e-3
    warmup_steps: int = 3
    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0
    top_layers_fraction: float = 0.6

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not 0.0 < self.top_layers_fraction <= 1.0:
            raise ValueError(f"top_layers_fraction must be within (0, 1], got {self.top_layers_fraction}")

    def layers(self, num_layers: int) -> list[int]:
        """LoRA on the top layers only: backward stops below them, which makes a SmolLM2 step
        ~25% cheaper, and a style of answering is learned there well enough."""
        count = max(1, math.ceil(num_layers * self.top_layers_fraction))
        return list(range(num_layers - count, num_layers))

    def sha256(self, style: DemoStyle) -> str:
        payload = {"format": _RECIPE_FORMAT, "adapter_id": style.adapter_id, "examples": style.examples, **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def ensure_demo_adapters(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    base_model: str = "smollm2-135m-instruct",
    steps: int | None = None,
    *,
    force: bool = False,
    styles: Sequence[DemoStyle] = DEMO_STYLES,
) -> dict[str, Path]:
    """Adapter id -> folder of every demo adapter, training only those not cached with this recipe.

    Safe to call from several processes at once: a file lock makes later callers wait and then
    find the adapters cached. The base model is loaded only when something has to be trained.
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = TrainingRecipe(base_model=base_model, **({} if steps is None else {"steps": steps}))
    folders: dict[str, Path] = {}
    with file_lock(out / ".demo-adapters.lock"):
        for style in styles:
            folder = out / style.adapter_id
            recipe_hash = recipe.sha256(style)
            if not force and _is_cached(folder, recipe_hash):
                logger.info("%s: cached in %s", style.adapter_id, folder)
            else:
                with _torch_threads(_usable_cpus()):
                    _train_and_publish(style, recipe, recipe_hash, folder)
            folders[style.adapter_id] = folder
    return folders


def _is_cached(folder: Path, recipe_hash: str) -> bool:
    try:
        stored = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stored, dict) or stored.get("recipe_sha256") != recipe_hash:
        return False
    return (folder / ADAPTER_CONFIG_FILE).is_file() and (folder / ADAPTER_WEIGHTS_FILE).is_file()


def _train_and_publish(style: DemoStyle, recipe: TrainingRecipe, recipe_hash: str, folder: Path) -> None:
    """Train into a hidden temp folder beside `folder`, validate it as the server will, then swap
    it in by rename, so neither a crash nor a reader ever sees half an adapter."""
    from deployments.engine.base_model import BaseModelSpec, load_base_model

    started = time.perf_counter()
    base = load_base_model(BaseModelSpec(name=recipe.base_model))
    remove_partial_folders(folder)  # under the lock, only a dead writer leaves these
    model, final_loss = _train(base.model, base.tokenizer, style, recipe)
    model.peft_config["default"].base_model_name_or_path = base.name
    seconds = 0.0

    def write(tmp: Path) -> None:
        nonlocal seconds
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        for extra in tmp.iterdir():  # save_pretrained also writes a README.md model card
            if extra.name not in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
                extra.unlink()
        read_checkpoint(tmp)
        seconds = time.perf_counter() - started
        (tmp / RECIPE_FILE).write_text(json.dumps({
            "recipe_sha256": recipe_hash,
            "adapter_id": style.adapter_id,
            "description": style.description,
            "recipe": asdict(recipe),
            "num_examples": len(style.examples),
            "final_loss": round(final_loss, 4),
            "train_seconds": round(seconds, 1),
            "versions": {name: _version(name) for name in ("torch", "peft", "transformers")},
        }, indent=2))
        for path in tmp.iterdir():  # safetensors makes its file private to its owner
            path.chmod(0o644)

    publish_folder(folder, write)
    answer = _generate(model, base.tokenizer, [HELD_OUT_QUESTIONS[0]], max_new_tokens=32)[0]
    log = logger.info if style.looks_right(answer) else logger.warning
    log("%s: trained in %.1f s (loss %.3f) -> %s; %r -> %r%s", style.adapter_id, seconds, final_loss, folder,
        HELD_OUT_QUESTIONS[0], answer, "" if style.looks_right(answer) else " (the style does not show yet)")


def _train(model: Any, tokenizer: Any, style: DemoStyle, recipe: TrainingRecipe) -> tuple[Any, float]:
    """LoRA on `model` (modified in place), AdamW, warmup then linear decay; returns the PEFT
    model and the mean loss of the last few steps."""
    from peft import LoraConfig, get_peft_model

    examples = [_encode(tokenizer, question, answer) for question, answer in style.examples]
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        layers_to_transform=recipe.layers(model.config.num_hidden_layers))
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        peft_model = get_peft_model(model, config)
        peft_model.train()
        parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
        batches = _batches(len(examples), recipe.batch_size, random.Random(recipe.seed))
        started = time.perf_counter()
        for step in range(recipe.steps):
            input_ids, attention_mask, labels = _collate([examples[i] for i in next(batches)], tokenizer.pad_token_id)
            loss = _answer_loss(peft_model.get_base_model(), input_ids, attention_mask, labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % max(1, recipe.steps // 4) == 0 or step + 1 == recipe.steps:
                logger.info("%s: step %d/%d loss %.3f (%.0f s)", style.adapter_id, step + 1, recipe.steps,
                            loss.item(), time.perf_counter() - started)
    peft_model.eval()
    tail = losses[-max(1, len(losses) // 5):]
    return peft_model, sum(tail) / len(tail)


def _answer_loss(causal_lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens, with the output layer applied to those
    positions only: the 49k-word head over every prompt token was ~15% of a SmolLM2 step."""
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])  # [answer tokens, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _lr_factor(step: int, recipe: TrainingRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    return max(0.1, (recipe.steps - step) / max(1, recipe.steps - recipe.warmup_steps))


def _batches(count: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless epochs of shuffled indices, cut into batches (an epoch's tail joins the next)."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            epoch = list(range(count))
            rng.shuffle(epoch)
            pending.extend(epoch)
        yield pending[:batch_size]
        del pending[:batch_size]


def _encode(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one exchange in the chat template; labels are -100 on the prompt,
    which is exactly what the server feeds the model before it generates."""
    user = [{"role": "user", "content": question}]
    prompt = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
    full = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                              tokenize=True, return_dict=False))
    if full[:len(prompt)] != prompt:
        raise ValueError(f"the chat template does not extend the prompt with the answer for {question!r}")
    end = _last_index(full, tokenizer.eos_token_id) + 1  # through the answer's end-of-turn token
    return full[:end], [-100] * len(prompt) + full[len(prompt):end]


def _last_index(ids: list[int], token_id: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token_id:
            return i
    raise ValueError("the chat template wrote no end-of-turn token after the answer")


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(row_labels)
    return input_ids, attention_mask, labels


@torch.no_grad()
def _generate(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one question at a time (no padding to get wrong)."""
    answers = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        input_ids = torch.tensor([list(prompt)])
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def compare_answers(
    adapters: dict[str, Path],
    base_model: str = "smollm2-135m-instruct",
    questions: Sequence[str] = HELD_OUT_QUESTIONS,
    max_new_tokens: int = 40,
) -> dict[str, list[str]]:
    """Greedy answers of the base model (key `base_model`) and of each adapter as saved on disk,
    to the same questions: the demo's proof that each adapter changes the model."""
    from peft import PeftModel

    from deployments.engine.base_model import BaseModelSpec, load_base_model

    base = load_base_model(BaseModelSpec(name=base_model))
    model = base.model
    answers = {base_model: _generate(model, base.tokenizer, questions, max_new_tokens)}
    for adapter_id, folder in adapters.items():
        peft_model = PeftModel.from_pretrained(model, folder)
        answers[adapter_id] = _generate(peft_model, base.tokenizer, questions, max_new_tokens)
        model = peft_model.unload()
    return answers


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's limit, where os.cpu_count() shows the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo_adapters", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="adapter folder (default: %(default)s)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct", help="base model name (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per adapter (default: {TrainingRecipe.steps})")
    parser.add_argument("--force", action="store_true", help="retrain even when the cached adapter matches")
    parser.add_argument("--no-compare", action="store_true", help="skip printing base vs adapter answers")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(_usable_cpus())
    started = time.perf_counter()
    adapters = ensure_demo_adapters(args.out, args.base_model, args.steps, force=args.force)
    print(f"demo adapters ready in {time.perf_counter() - started:.1f} s under {args.out}")
    if not args.no_compare:
        for adapter_id, answers in compare_answers(adapters, args.base_model, HELD_OUT_QUESTIONS).items():
            print(f"\n== {adapter_id}")
            for question, answer in zip(HELD_OUT_QUESTIONS, answers):
                print(f"  {question}\n    -> {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
