"""Generator of the demo model's training corpus: simple stories and chats about them.

Everything is drawn from a seeded ``random.Random``, so a seed fixes the corpus exactly.
The fact vocabulary is kept small on purpose: a 3-4M parameter model trained for half an hour
on two CPU cores can learn to copy the right fact out of a story it was told, but not to
memorise a large world.  Each story carries its facts (name, place, colour, object, animal,
feeling), so tests can ask questions whose answers are known.

A dialogue is a list of ``{"role", "content"}`` messages; ``render`` turns it into the exact
text the chat template produces, and every assistant turn ends with ``END``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

USER, ASSISTANT, SYSTEM, END, PAD = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]  # ids 0..4 in this order

# The chat template shipped in tokenizer_config.json; `render` below must match it byte for byte.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

BOYS = ["Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Tim"]
GIRLS = ["Lily", "Mia", "Anna", "Emma", "Zoe", "Lucy", "Sara"]
NAMES = BOYS + GIRLS
PLACES = ["park", "beach", "forest", "farm", "garden", "lake", "school", "zoo", "river", "hill",
          "shop", "library"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown"]
ANIMALS = ["cat", "dog", "bird", "frog", "rabbit", "duck", "horse", "fish", "mouse", "bear", "fox",
           "owl"]
OBJECTS = ["ball", "kite", "hat", "box", "boat", "book", "cup", "bike", "balloon", "drum", "car",
           "bag"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "angry", "calm", "surprised",
            "sleepy"]

# The kinds of question the demo answers; `FACT_WORDS` lets tests check an answer names the right
# member of a kind and no other one.
KINDS = ("place", "colour", "animal", "feeling", "name", "object")
FACT_WORDS = {"place": PLACES, "colour": COLOURS, "animal": ANIMALS, "feeling": FEELINGS,
              "name": NAMES, "object": OBJECTS}

# A feeling gets a sentence that fits it, so stories read as cause and effect, not a list.
FEELING_LINES = {
    "happy": ["{N} smiled all the way home.", "It was a good day."],
    "sad": ["{He} wanted to go home.", "{N} cried a little."],
    "scared": ["{He} held {his} mom's hand.", "{N} did not want to be alone."],
    "excited": ["{N} jumped up and down.", "{He} wanted to come back soon."],
    "tired": ["{He} went to bed early.", "{N} had a long nap."],
    "proud": ["{His} mom gave {him} a big hug.", "{N} told everyone about it."],
    "angry": ["{N} said it was not fair.", "{He} stamped {his} feet."],
    "calm": ["{N} sat down and looked at the sky.", "Everything was quiet."],
    "surprised": ["{N} did not know what to say.", "{He} opened {his} eyes wide."],
    "sleepy": ["{He} yawned and closed {his} eyes.", "{N} fell asleep on the way home."],
}


@dataclass(frozen=True)
class Story:
    """A short story and the facts it states."""

    name: str
    girl: bool
    place: str
    colour: str
    obj: str
    animal: str
    feeling: str
    obj_verb: str  # "had" or "found": answers about the object use the story's own verb
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def fact(self, kind: str) -> str:
        """The word that answers a question of this kind."""
        return {"place": self.place, "colour": self.colour, "animal": self.animal,
                "feeling": self.feeling, "name": self.name, "object": self.obj}[kind]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fill(template: str, s: dict[str, str]) -> str:
    out = template.format(**s)
    return out[0].upper() + out[1:]


def make_story(rng: random.Random, *, name: str | None = None, animal: str | None = None,
               place: str | None = None) -> Story:
    """Draw a story; keyword arguments pin a fact (for "a story about a cat")."""
    name = name or rng.choice(NAMES)
    girl = name in GIRLS
    f = {
        "N": name, "He": "She" if girl else "He", "he": "she" if girl else "he",
        "his": "her" if girl else "his", "His": "Her" if girl else "His", "him": "her" if girl else "him",
        "kid": "girl" if girl else "boy",
        "P": place or rng.choice(PLACES), "C": rng.choice(COLOURS), "O": rng.choice(OBJECTS),
        "A": animal or rng.choice(ANIMALS), "F": rng.choice(FEELINGS),
    }
    f["aC"] = f"{article(f['C'])} {f['C']}"
    f["aA"] = f"{article(f['A'])} {f['A']}"
    obj_verb = rng.choice(["had", "had", "found"])

    intro = rng.choice([
        "Once upon a time, there was a little {kid} named {N}.",
        "{N} was a little {kid}.",
        "There was a {kid} called {N}.",
        "",
    ])
    place_s = rng.choice([
        "One day, {N} went to the {P}.",
        "One morning, {N} walked to the {P}.",
        "On a sunny day, {N} went to the {P} with {his} mom.",
        "One day, {N} ran to the {P}.",
        "After lunch, {N} went to the {P}.",
    ])
    if obj_verb == "had":
        obj_s = rng.choice([
            "{N} had {aC} {O}.",
            "{He} had {aC} {O}.",
            "{N} took {his} {C} {O} with {him}.",
        ]).replace("{He} had", "{N} had" if not intro else "{He} had")
        obj_verb = "had"
    else:
        obj_s = rng.choice([
            "{He} found {aC} {O}.",
            "There {he} found {aC} {O}.",
            "{N} found {aC} {O} on the ground.",
        ])
    animal_s = rng.choice([
        "At the {P}, {he} saw {aA}.",
        "There {he} saw a little {A}.",
        "Then {N} met {aA}.",
        "{N} saw {aA} near a tree.",
    ])
    fillers = [
        "The {A} liked the {O}.",
        "The {A} wanted to play.",
        "They played with the {O} all day.",
        "{N} and the {A} ran and jumped.",
        "The sun was warm.",
        "They sang a song together.",
        "The {A} was very fast.",
        "{N} gave the {A} some food.",
    ]
    feeling_s = rng.choice([
        "{N} felt {F}.",
        "At the end of the day, {N} felt very {F}.",
        "{N} was very {F}.",
        "That made {N} feel {F}.",
    ])
    ending = rng.choice(FEELING_LINES[f["F"]] + ["Then they went home.", "The end.", ""])

    # The place comes before the animal seen there; the object may come first or second.
    body = [place_s, obj_s] if rng.random() < 0.6 else [obj_s, place_s]
    if obj_verb == "found" and body[0] == obj_s:
        body.reverse()  # "There she found" needs the place before it
    body.append(animal_s)
    body += rng.sample(fillers, rng.randint(0, 2))
    parts = [p for p in [intro, *body, feeling_s, ending] if p]
    sentences = tuple(_fill(p, f) for p in parts)
    return Story(name=name, girl=girl, place=f["P"], colour=f["C"], obj=f["O"], animal=f["A"],
                 feeling=f["F"], obj_verb=obj_verb, sentences=sentences)


def make_question(rng: random.Random, story: Story, kind: str) -> tuple[str, str]:
    """A question about `story` of this kind, and the assistant's full answer sentence."""
    n, p, c, o, a, fe = story.name, story.place, story.colour, story.obj, story.animal, story.feeling
    if kind == "place":
        q, ans = rng.choice([
            (f"Where did {n} go?", f"{n} went to the {p}."),
            (f"Where was {n}?", f"{n} was at the {p}."),
            (f"Where did {n} go that day?", f"{n} went to the {p}."),
        ])
    elif kind == "colour":
        q = rng.choice([f"What colour was the {o}?", f"What color was the {o}?",
                        f"What colour was {n}'s {o}?"])
        ans = f"The {o} was {c}."
    elif kind == "animal":
        q, ans = rng.choice([
            (f"What animal did {n} see?", f"{n} saw {article(a)} {a}."),
            (f"Which animal did {n} meet?", f"{n} met {article(a)} {a}."),
            ("What animal was in the story?", f"The animal was {article(a)} {a}."),
        ])
    elif kind == "feeling":
        q, ans = rng.choice([
            (f"How did {n} feel?", f"{n} felt {fe}."),
            (f"How did {n} feel at the end?", f"{n} felt {fe}."),
            (f"Was {n} happy or sad?" if fe in ("happy", "sad") else f"How did {n} feel?", f"{n} felt {fe}."),
        ])
    elif kind == "name":
        q, ans = rng.choice([
            (f"Who went to the {p}?", f"{n} went to the {p}."),
            (f"Who saw the {a}?", f"{n} saw the {a}."),
            ("What was the name of the " + ("girl?" if story.girl else "boy?"),
             f"The {'girl' if story.girl else 'boy'} was called {n}."),
        ])
    elif kind == "object":
        verb = "have" if story.obj_verb == "had" else "find"
        q = f"What did {n} {verb}?"
        ans = f"{n} {story.obj_verb} {article(c)} {c} {o}."
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return q, ans


# Tested kinds are drawn more often than the others.
_KIND_WEIGHTS = {"place": 4, "colour": 4, "animal": 4, "feeling": 4, "name": 2, "object": 2}


def _pick_kind(rng: random.Random, exclude: tuple[str, ...] = ()) -> str:
    kinds = [k for k in _KIND_WEIGHTS if k not in exclude]
    return rng.choices(kinds, weights=[_KIND_WEIGHTS[k] for k in kinds])[0]


def _tell(rng: random.Random, story: Story, question: str) -> str:
    """A user turn that tells `story` and asks `question`."""
    lead = rng.choice(["", "", "", "Here is a story. ", "Listen to this story. ", "Read this story. "])
    sep = rng.choice([" ", " ", "\n", "\n\n"])
    return f"{lead}{story.text}{sep}{question}"


def make_qa(rng: random.Random, kind: str | None = None) -> tuple[str, str, str]:
    """One user turn (story + question), the word the answer must name, and the question kind."""
    kind = kind or rng.choice(("place", "colour", "animal", "feeling"))
    story = make_story(rng)
    question, _ = make_question(rng, story, kind)
    return _tell(rng, story, question), story.fact(kind), kind


STORY_REQUESTS = [
    "Tell me a story.", "Tell me a story.", "Tell me a story!", "Can you tell me a story?",
    "Please tell me a story.", "Tell me a short story.", "I want a story.",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.", "You are a friendly story teller.",
    "You answer questions about stories.", "You are a kind assistant.",
]
SMALL_TALK = [
    ("Hello!", "Hello! Tell me a story and ask me about it, or ask me for a story."),
    ("Hi", "Hi! Tell me a story and ask me about it, or ask me for a story."),
    ("Hello, how are you?", "I am happy, thank you. Do you want to hear a story?"),
    ("Who are you?", "I am a small story model. I can tell stories and answer questions about them."),
    ("What can you do?", "I can tell you a story. I can also answer questions about a story you tell me."),
    ("Thank you!", "You are welcome!"),
    ("Thanks.", "You are welcome!"),
    ("Goodbye!", "Goodbye! Come back for another story."),
]


def _story_request(rng: random.Random) -> tuple[str, Story]:
    r = rng.random()
    if r < 0.6:
        return rng.choice(STORY_REQUESTS), make_story(rng)
    if r < 0.8:
        a = rng.choice(ANIMALS)
        return f"Tell me a story about {article(a)} {a}.", make_story(rng, animal=a)
    if r < 0.9:
        n = rng.choice(NAMES)
        return f"Tell me a story about {n}.", make_story(rng, name=n)
    p = rng.choice(PLACES)
    return f"Tell me a story about the {p}.", make_story(rng, place=p)


def _follow_ups(rng: random.Random, story: Story, asked: tuple[str, ...], messages: list[dict]) -> None:
    """Append 0-3 further questions about the same story, each with its answer.

    Follow-ups are cheap (a dozen tokens) and each one is another lesson in finding a fact in
    the story, so they carry most of the question answering signal per token of training.
    """
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        kind = _pick_kind(rng, exclude=asked)
        q, a = make_question(rng, story, kind)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        asked += (kind,)


def _one_exchange(rng: random.Random) -> list[dict[str, str]]:
    """Story + question(s), a request for a story (+ questions), or a little small talk."""
    messages: list[dict[str, str]] = []
    r = rng.random()
    if r < 0.08:
        hello, reply = rng.choice(SMALL_TALK)
        messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        if rng.random() < 0.5:
            req, story = _story_request(rng)
            messages += [{"role": "user", "content": req}, {"role": "assistant", "content": story.text}]
    elif r < 0.32:
        req, story = _story_request(rng)
        messages += [{"role": "user", "content": req}, {"role": "assistant", "content": story.text}]
        _follow_ups(rng, story, (), messages)
    else:
        story = make_story(rng)
        kind = _pick_kind(rng)
        q, a = make_question(rng, story, kind)
        messages += [{"role": "user", "content": _tell(rng, story, q)}, {"role": "assistant", "content": a}]
        _follow_ups(rng, story, (kind,), messages)
    if rng.random() < 0.08:
        messages += [{"role": "user", "content": rng.choice(["Thank you!", "Thanks."])},
                     {"role": "assistant", "content": "You are welcome!"}]
    return messages


def make_dialogue(rng: random.Random) -> list[dict[str, str]]:
    """One chat, sometimes with a system message, sometimes two exchanges long.

    In the app a chat goes on: a second story told later in the same chat must be answered
    from, so some chats hold two stories and the questions follow the latest one.
    """
    messages: list[dict[str, str]] = []
    if rng.random() < 0.15:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages += _one_exchange(rng)
    if rng.random() < 0.12:
        messages += _one_exchange(rng)
    return messages


def make_dialogues(seed: int, n: int) -> list[list[dict[str, str]]]:
    """`n` dialogues, fixed by `seed`."""
    rng = random.Random(seed)
    return [make_dialogue(rng) for _ in range(n)]


def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template in Python (tests check the two agree)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages)
    return text + (f"{ASSISTANT}\n" if add_generation_prompt else "")


def corpus_text(seed: int, n: int) -> list[str]:
    """Rendered dialogues, one string each: the training documents."""
    return [render(d) for d in make_dialogues(seed, n)]


def names_fact(answer: str, word: str, kind: str) -> bool:
    """True if `answer` names `word` and no other fact word of the same kind.

    Whole words only, so "red" is not found in "scared" nor "cat" in "catch".
    """
    found = {w for w in re.findall(r"[a-z]+", answer.lower()) if w in _FACT_SETS[kind]}
    return found == {word.lower()}


def sentences(text: str) -> list[str]:
    """The sentences of `text`: pieces ending in ".", "!" or "?" (a trailing fragment is dropped)."""
    return [s.strip() for s in re.findall(r"[^.!?]*[.!?]", text) if s.strip()]


def vocabulary(seed: int = 0, n: int = 5000) -> set[str]:
    """Lower-case words the corpus uses: a story drawn from the model should use only these."""
    words: set[str] = set()
    for d in make_dialogues(seed, n):
        for m in d:
            words.update(re.findall(r"[a-z']+", m["content"].lower()))
    return words


_FACT_SETS = {k: {w.lower() for w in v} for k, v in FACT_WORDS.items()}
