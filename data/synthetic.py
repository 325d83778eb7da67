"""The embedded demo data, generated here from a seed: no downloads, no third-party text.

    python -m data.synthetic --out DIR [--seed S] [--mb N] [--sft-examples N] [--eval-fraction F]

Writes
    DIR/pretrain/train.txt, DIR/pretrain/eval.txt   one document per line: short stories from a
        probabilistic grammar about people, quantities, objects, places and times, whose
        sentences keep track of the quantities they mention (counts change consistently);
    DIR/sft/train.jsonl, DIR/sft/eval.jsonl         {"prompt", "response"} grade-school arithmetic
        word problems, answered step by step and ending in a ``#### <number>`` line.
The same seed gives the same bytes; ``--mb`` sizes the pre-training text (train + eval).
"""

import argparse
import json
import os
import random

from core.cli import run_main
from core.errors import DataError
from core.files import atomic_directory

NAMES = ["Maya", "Tom", "Aisha", "Leo", "Priya", "Sam", "Nora", "Kenji", "Lucia", "Omar", "Ines", "Felix", "Hana",
         "Ravi", "Zoe", "Mateo", "Elena", "Kofi", "Mei", "Jonas"]
PRONOUN = {name: ("she" if name in {"Maya", "Aisha", "Priya", "Nora", "Lucia", "Ines", "Hana", "Zoe", "Elena", "Mei"}
                  else "he") for name in NAMES}
OBJECTS = [("apple", "apples"), ("book", "books"), ("marble", "marbles"), ("pencil", "pencils"), ("cookie", "cookies"),
           ("stamp", "stamps"), ("shell", "shells"), ("coin", "coins"), ("sticker", "stickers"), ("egg", "eggs"),
           ("flower", "flowers"), ("ticket", "tickets"), ("card", "cards"), ("orange", "oranges"), ("cup", "cups")]
PLACES = ["the market", "the library", "the park", "the school", "the bakery", "the harbour", "the garden",
          "the station", "the museum", "the farm", "the river bank", "the town square"]
TIMES = ["in the morning", "at noon", "in the afternoon", "in the evening", "on Monday", "on Saturday",
         "after lunch", "before dinner", "at nine o'clock", "at half past four", "on a rainy day", "in spring"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("crate", "crates")]
COLOURS = ["red", "blue", "green", "yellow", "white", "small", "large", "old", "new"]


class _Story:
    """One document: a person, an object and a count that the sentences update consistently."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.name = rng.choice(NAMES)
        self.pronoun = PRONOUN[self.name]
        self.object = rng.choice(OBJECTS)
        self.count = rng.randint(2, 40)
        self.place = rng.choice(PLACES)
        self.friend = rng.choice([n for n in NAMES if n != self.name])

    def _things(self, n):
        return f"{n} {self.object[0] if n == 1 else self.object[1]}"

    def opening(self):
        rng = self.rng
        return rng.choice([
            f"{rng.choice(TIMES).capitalize()}, {self.name} went to {self.place} with {self._things(self.count)}.",
            f"{self.name} kept {self._things(self.count)} in a {rng.choice(COLOURS)} {rng.choice(CONTAINERS)[0]}.",
            f"At {self.place}, {self.name} counted {self._things(self.count)} {rng.choice(TIMES)}.",
        ])

    def event(self):
        rng = self.rng
        kind = rng.random()
        if kind < 0.3:
            n = rng.randint(1, 12)
            self.count += n
            return f"{rng.choice(TIMES).capitalize()}, {self.pronoun} found {self._things(n)} more, so {self.pronoun} had {self._things(self.count)}."
        if kind < 0.55 and self.count > 1:
            n = rng.randint(1, self.count - 1)
            self.count -= n
            return f"{self.pronoun.capitalize()} gave {self._things(n)} to {self.friend} and kept {self._things(self.count)}."
        if kind < 0.7 and self.count <= 60:
            self.count *= 2
            return f"{self.friend} doubled the pile, and now there were {self._things(self.count)}."
        if kind < 0.85:
            self.place = rng.choice(PLACES)
            return f"Then {self.pronoun} walked to {self.place} {rng.choice(TIMES)}."
        return rng.choice([
            f"{self.friend} asked how many {self.object[1]} were left, and {self.name} said {self.count}.",
            f"The {rng.choice(COLOURS)} {rng.choice(CONTAINERS)[0]} was heavy with {self._things(self.count)}.",
            f"It took {rng.randint(2, 50)} minutes to sort them by colour.",
        ])

    def closing(self):
        return self.rng.choice([
            f"In the end {self.name} had {self._things(self.count)}.",
            f"That is how {self.name} came home from {self.place} with {self._things(self.count)}.",
            f"{self.friend} wrote down the number {self.count} so nobody would forget.",
        ])


def story(rng: random.Random) -> str:
    """One pre-training document (a single line)."""
    doc = _Story(rng)
    return " ".join([doc.opening()] + [doc.event() for _ in range(rng.randint(2, 7))] + [doc.closing()])


def word_problem(rng: random.Random) -> dict:
    """One SFT example: a two- or three-step arithmetic problem and its worked answer."""
    name, friend = rng.sample(NAMES, 2)
    singular, plural = rng.choice(OBJECTS)
    start, bought, price = rng.randint(3, 60), rng.randint(2, 30), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        given = rng.randint(1, start + bought - 1)
        left = start + bought - given
        prompt = (f"{name} has {start} {plural}. {PRONOUN[name].capitalize()} buys {bought} more at {rng.choice(PLACES)} "
                  f"and then gives {given} to {friend}. How many {plural} does {name} have now?")
        steps = [f"{name} starts with {start} {plural}.", f"After buying {bought} more: {start} + {bought} = {start + bought}.",
                 f"After giving {given} away: {start + bought} - {given} = {left}."]
        answer = left
    elif kind == 1:
        boxes = rng.randint(2, 12)
        total = boxes * bought
        prompt = (f"There are {boxes} {rng.choice(CONTAINERS)[1]} with {bought} {plural} in each. {name} sells every "
                  f"{singular} for {price} dollars. How many dollars does {name} get?")
        steps = [f"Number of {plural}: {boxes} * {bought} = {total}.", f"Money: {total} * {price} = {total * price} dollars."]
        answer = total * price
    elif kind == 2:
        groups = rng.randint(2, 9)
        total = groups * rng.randint(2, 15)
        each = total // groups
        eaten = rng.randint(0, each - 1)
        prompt = (f"{name} shares {total} {plural} equally among {groups} friends. Each friend uses {eaten} of them "
                  f"{rng.choice(TIMES)}. How many {plural} does each friend have left?")
        steps = [f"Each friend gets {total} / {groups} = {each}.", f"Left for each: {each} - {eaten} = {each - eaten}."]
        answer = each - eaten
    else:
        spent = rng.randint(1, start - 2)
        now = start - spent
        less = rng.randint(0, now - 1)
        prompt = (f"{name} had {start} dollars and spent {spent} dollars on {plural}. {friend} has {less} dollars less "
                  f"than {name} has now. How much money do they have together?")
        other = now - less
        steps = [f"{name} now has {start} - {spent} = {now} dollars.", f"{friend} has {now} - {less} = {other} dollars.",
                 f"Together: {now} + {other} = {now + other} dollars."]
        answer = now + other
    return {"prompt": prompt, "response": "\n".join(steps + [f"#### {answer}"])}


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")


def generate(out_dir: str, *, seed: int = 0, megabytes: float = 4.0, sft_examples: int = 4000,
             eval_fraction: float = 0.05) -> dict:
    """Write the demo data set into ``out_dir`` (atomically) and return counts per file."""
    if megabytes <= 0:
        raise DataError(f"--mb must be > 0, got {megabytes}")
    if sft_examples < 2:
        raise DataError(f"--sft-examples must be >= 2 (train and eval), got {sft_examples}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    rng = random.Random(seed)
    documents, size = [], 0
    while size < megabytes * 1e6:
        documents.append(story(rng))
        size += len(documents[-1].encode()) + 1
    problems = [json.dumps(word_problem(rng)) for _ in range(sft_examples)]
    n_eval_docs = max(1, int(len(documents) * eval_fraction))
    n_eval_sft = max(1, int(sft_examples * eval_fraction))
    files = {
        "pretrain/train.txt": documents[n_eval_docs:],
        "pretrain/eval.txt": documents[:n_eval_docs],
        "sft/train.jsonl": problems[n_eval_sft:],
        "sft/eval.jsonl": problems[:n_eval_sft],
    }
    with atomic_directory(out_dir) as staging:
        for relative, lines in files.items():
            os.makedirs(os.path.join(staging, os.path.dirname(relative)), exist_ok=True)
            _write_lines(os.path.join(staging, relative), lines)
    return {relative: len(lines) for relative, lines in files.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--mb", type=float, default=4.0, help="size of the pre-training text in MB (default 4)")
    parser.add_argument("--sft-examples", type=int, default=4000, help="word problems in total (default 4000)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="share held out for eval (default 0.05)")
    args = parser.parse_args(argv)
    counts = generate(args.out, seed=args.seed, megabytes=args.mb, sft_examples=args.sft_examples,
                      eval_fraction=args.eval_fraction)
    for relative, count in counts.items():
        print(f"{os.path.join(args.out, relative)}: {count} {'documents' if relative.endswith('.txt') else 'examples'}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
