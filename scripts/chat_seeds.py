"""What the teacher is asked to talk about: topics x task kinds x follow-ups, and recall scripts.

`plan_dialogue(rng)` draws one conversation plan: an optional system prompt, a first user message
(a topic and a task kind), and an endless supply of later user turns (follow-ups, topic switches
and, in a share of chats, "remember X ... what was X?" recalls that ask for something told a few turns
earlier). `sample_teacher_chats.py` scripts these user turns and lets the teacher write every reply.

The recall words and facts here are disjoint from bench/recall_probe.py's (a test checks it), so a
student trained on these chats is not taught the probe's answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

DOMAINS: dict[str, list[str]] = {
    "science": ["photosynthesis", "black holes", "the water cycle", "volcanoes", "the periodic table", "magnets",
                "the speed of light", "earthquakes", "DNA", "gravity", "the immune system", "plate tectonics",
                "electricity", "sound waves", "the human brain", "antibiotics", "the Big Bang", "fossils",
                "climate change", "the ozone layer", "atoms", "evolution", "tides", "rainbows", "clouds"],
    "history": ["the French revolution", "the Roman empire", "the printing press", "the Silk Road", "the moon landing",
                "ancient Egypt", "the Industrial Revolution", "the Renaissance", "the Vikings", "the Cold War",
                "the invention of the telephone", "the Aztecs", "the Great Wall of China", "the first computers",
                "the history of writing", "medieval castles", "the Olympic games", "the age of exploration"],
    "daily life": ["budgeting money", "cooking rice", "cleaning a kitchen", "packing for a trip", "sleeping better",
                   "making friends in a new city", "moving house", "saving for a holiday", "getting up early",
                   "organizing a closet", "grocery shopping on a budget", "writing a thank-you note",
                   "planning a birthday party", "caring for houseplants", "commuting by bike", "doing laundry"],
    "food": ["baking bread", "sourdough starters", "coffee", "tea", "pizza", "healthy breakfasts", "spices",
             "vegetarian dinners", "chocolate", "fermented foods", "soup", "street food", "pasta", "cheese"],
    "nature": ["honeybees", "octopuses", "coral reefs", "penguins", "wolves", "spiders", "deserts", "glaciers",
               "the Amazon rainforest", "mountains", "rivers", "migratory birds", "mushrooms", "whales", "owls"],
    "technology": ["the internet", "machine learning", "electric cars", "solar panels", "batteries", "smartphones",
                   "passwords", "databases", "recursion in programming", "Python lists", "web browsers",
                   "cloud storage", "GPS", "3D printing", "robots", "open-source software", "spreadsheets"],
    "health": ["vaccines", "the human heart", "meditation", "marathon training", "stretching", "drinking water",
               "vitamins", "posture at a desk", "stress", "first aid for a cut", "yoga", "walking every day"],
    "arts": ["jazz music", "Shakespeare", "origami", "watercolour painting", "photography", "poetry",
             "learning the guitar", "film editing", "museums", "fairy tales", "graphic novels", "ballet"],
    "work and study": ["job interviews", "public speaking", "learning a new language", "taking notes",
                       "writing a CV", "time management", "working from home", "exam revision",
                       "giving feedback", "starting a small business", "negotiating a salary"],
    "society": ["democracy", "libraries", "volunteering", "recycling", "friendship", "city parks",
                "public transport", "voting", "kindness", "tourism", "online privacy", "community gardens"],
    "places": ["Japan", "Iceland", "Kenya", "Peru", "Canada", "Italy", "the Sahara", "Antarctica", "New Zealand",
               "India", "Norway", "Mexico City", "the Alps", "Australia's outback"],
}

TASKS: list[tuple[str, str]] = [  # (task kind, template: {t} topic, {u} another topic)
    ("explain", "Explain {t} to a ten-year-old."),
    ("explain", "Can you explain how {t} works?"),
    ("explain", "Hi! Can you help me understand {t}?"),
    ("list", "Give me three interesting facts about {t}."),
    ("list", "List five things everyone should know about {t}."),
    ("list", "What are some common mistakes people make with {t}?"),
    ("compare", "Compare {t} and {u}."),
    ("compare", "What are the pros and cons of {t}?"),
    ("write", "Write a short poem about {t}."),
    ("write", "Write a short story involving {t}."),
    ("write", "Write a friendly email to a colleague about {t}."),
    ("write", "Write a diary entry from someone who just learned about {t}."),
    ("write", "Write a short dialogue between two friends talking about {t}."),
    ("write", "Write a one-paragraph news report about {t}."),
    ("write", "Write a short persuasive essay about why {t} matters."),
    ("write", "Write a product review of a book about {t}."),
    ("summarise", "Summarize what you know about {t} in two sentences."),
    ("summarise", "Give me a one-sentence summary of {t}."),
    ("advice", "I'm new to {t}. Where should I start?"),
    ("advice", "What advice would you give a friend interested in {t}?"),
    ("plan", "Make a simple one-week plan for learning about {t}."),
    ("brainstorm", "Brainstorm ten questions a student might ask about {t}."),
    ("opinion", "What is the most common misconception about {t}?"),
    ("quiz", "Quiz me on {t} with three questions."),
    ("how-to", "How would you teach someone about {t}?"),
    ("casual", "I've been thinking about {t} lately. What do you think?"),
    ("casual", "Tell me something surprising about {t}."),
]

FOLLOW_UPS = [
    "Can you tell me more?", "Give me an example.", "Summarize that in one sentence.", "Why is that?",
    "Explain it differently.", "What else should I know about {t}?", "Is that really true?", "Make it shorter.",
    "Can you turn that into a list?", "What would a beginner get wrong here?", "How does that compare to {u}?",
    "Can you give me a real-life example?", "What's the most important point?", "Now explain it to an expert.",
    "That's interesting. What happens next?", "Could you rewrite that more formally?", "Thanks! One more question: why?",
    "I don't understand the second part.", "Give me a fun fact about that.", "How would you say that to a child?",
]
SWITCHES = ["Thanks! Now tell me about {u}.", "Let's change the subject. {task}", "Great. Next question: {task}"]
SYSTEMS = [None, None, None, "You are a concise assistant.", "You are a friendly teacher who explains things simply.",
           "You are a helpful assistant. Answer in plain English.", "You are a patient tutor.",
           "You are a cheerful assistant who likes examples."]

RECALL_WORDS = ["harp", "tulip", "biscotti", "quartz", "lagoon", "sparrow", "juniper", "cobalt", "pretzel", "tundra",
                "mosaic", "paprika", "gondola", "acorn", "sapphire", "bramble", "igloo", "thimble", "cactus", "zephyr",
                "lychee", "parsnip", "hammock", "beacon", "walrus", "saffron", "fjord", "marzipan", "topaz", "quill"]
RECALL_NAMES = ["Imogen", "Rafael", "Theodora", "Casimir", "Leonie", "Dmitri", "Ottilie", "Emeka", "Saoirse", "Anselm",
                "Priya", "Tobias", "Marisol", "Fergus", "Yuki", "Henrietta", "Lorenzo", "Ingrid", "Kofi", "Astrid"]
RECALL_PLACES = ["Porto", "Valparaiso", "Tbilisi", "Winnipeg", "Bergen", "Kyoto", "Marrakesh", "Galway", "Hobart",
                 "Ljubljana", "Cusco", "Tallinn", "Dubrovnik", "Quebec", "Zanzibar"]
RECALL_FACTS = [  # (statement, question, answer pool): {x} is drawn from the pool
    ("My aunt is called {x}.", "What is my aunt called?", RECALL_NAMES),
    ("My neighbour's name is {x}.", "What is my neighbour's name?", RECALL_NAMES),
    ("My goldfish is named {x}.", "What is my goldfish named?", RECALL_NAMES),
    ("I grew up in {x}.", "Where did I grow up?", RECALL_PLACES),
    ("My next holiday is in {x}.", "Where is my next holiday?", RECALL_PLACES),
    ("The code for my bike lock is {x}.", "What is the code for my bike lock?", None),
    ("My bus number is {x}.", "What is my bus number?", None),
    ("My favourite gemstone is {x}.", "What is my favourite gemstone?", ["quartz", "sapphire", "topaz", "opal", "jade"]),
]


@dataclass
class DialoguePlan:
    """One conversation's user side. `turns()` yields user messages; the first may follow a system prompt."""

    topic: str
    other: str
    system: str | None
    first: str
    task_kind: str
    recall: tuple[str, str, int] | None  # (answer, question, turns after the telling)
    temperature: float
    rng: random.Random = field(repr=False, default_factory=random.Random)

    def turns(self) -> Iterator[str]:
        yield self.first
        asked_in = self.recall[2] if self.recall else -1
        turn = 0
        while True:
            turn += 1
            if turn == asked_in:
                yield self.recall[1]
            elif self.rng.random() < 0.15:
                self.topic, self.other = self.other, random_topic(self.rng)
                yield self.rng.choice(SWITCHES).format(u=self.topic, task=task_text(self.rng, self.topic, self.other)[1])
            else:
                yield self.rng.choice(FOLLOW_UPS).format(t=self.topic, u=self.other)


def random_topic(rng: random.Random) -> str:
    return rng.choice(rng.choice(list(DOMAINS.values())))


def task_text(rng: random.Random, topic: str, other: str) -> tuple[str, str]:
    kind, template = rng.choice(TASKS)
    return kind, template.format(t=topic, u=other)


def recall_item(rng: random.Random) -> tuple[str, str, str]:
    """(statement, question, answer): a word to remember or a fact about the user."""
    if rng.random() < 0.4:
        word = rng.choice(RECALL_WORDS)
        return (f"Please remember this word: {word}.", "What was the word I asked you to remember?", word)
    statement, question, pool = rng.choice(RECALL_FACTS)
    answer = rng.choice(pool) if pool else str(rng.randint(10, 9999))
    return statement.format(x=answer), question, answer


def plan_dialogue(rng: random.Random, recall_share: float = 0.3) -> DialoguePlan:
    """A random conversation plan; in `recall_share` of them something is told first and asked 1-4 turns later."""
    topic, other = random_topic(rng), random_topic(rng)
    kind, first = task_text(rng, topic, other)
    recall = None
    if rng.random() < recall_share:
        statement, question, answer = recall_item(rng)
        first = f"{statement} I'll ask you about it later. {first}"
        recall = (answer, question, rng.randint(1, 4))
    return DialoguePlan(topic, other, rng.choice(SYSTEMS), first, kind, recall, rng.uniform(0.7, 1.0),
                        random.Random(rng.random()))


def all_topics() -> list[str]:
    return [t for topics in DOMAINS.values() for t in topics]
