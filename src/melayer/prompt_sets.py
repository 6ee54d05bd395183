"""Built-in prompt sets: short, varied texts whose first words differ (prose, questions, code, lists, numbers,
other languages), so that claims about "the first token" are not claims about one token id.

``SCAN_TEXTS`` is what ``melayer scan`` reads by default; :func:`explain_prompts` builds the explain sets: each
text plain (its own first token) and chat-templated (the template's first token, the same in every prompt).
"""
from __future__ import annotations

from .text import Prompt

SCAN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and children were playing.",
    "In 1905, Albert Einstein published four papers that changed physics: on the photoelectric effect, "
    "Brownian motion, special relativity, and mass-energy equivalence.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ingredients: two cups of flour, one egg, a pinch of salt, and milk. Mix well, then rest for an hour.",
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Summer is here; the days are long, the evenings warm, and the beaches crowded with tourists.",
]

VARIED_TEXTS = SCAN_TEXTS + [
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts.",
    "Why do cats purr when they are content, and sometimes when they are hurt?",
    "import numpy as np\nx = np.linspace(0, 1, 11)\nprint(x.mean())\n",
    "Dear Sir or Madam, I am writing to ask about the apartment advertised on your website last week.",
    "42 is the answer, according to a famous novel, but nobody remembers the question.",
    "Once upon a time, a small dragon lived under a bridge and collected shiny buttons.",
    "Step 1: open the lid. Step 2: pour in the water. Step 3: wait until it boils.",
    "Bonjour, je voudrais réserver une table pour deux personnes ce soir, s'il vous plaît.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "Honestly, the movie was too long, but the music and the photography were wonderful.",
    "Mount Everest rises 8,849 metres above sea level on the border of Nepal and China.",
    "If a train leaves at 3 pm travelling 60 miles per hour, when does it cover 150 miles?",
    "Quantum computers use qubits, which can hold a superposition of zero and one.",
    "Roses are red, violets are blue, sugar is sweet, and so are you.",
    "Napoleon was defeated at Waterloo in 1815 by a coalition led by Wellington and Blücher.",
    "Please summarise the main arguments of the article in three short bullet points.",
    "<html><body><h1>Welcome</h1><p>This is a test page.</p></body></html>",
    "Yesterday it rained all afternoon, so we stayed inside and played cards.",
    "Elephants communicate with low-frequency rumbles that travel several kilometres.",
    "How many prime numbers are there between 1 and 100?",
    "Translate into German: the library opens at nine and closes at six.",
    "Carbon dating estimates the age of organic material from the decay of carbon-14.",
    "Breaking news: the city council approved the new bicycle lanes by a narrow vote.",
    "Java and Python are both popular, but they handle types very differently.",
    "My grandmother's recipe calls for butter, sugar, eggs and a splash of vanilla.",
    "Given a list of integers, return the indices of the two numbers that add up to a target.",
    "Volcanoes form where tectonic plates meet or where hot plumes rise through the mantle.",
    "Can you recommend three books about the history of mathematics?",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Shakespeare wrote Hamlet around 1600; it is his longest play.",
    "Tomorrow's forecast: cloudy in the morning, sunny in the afternoon, with a light breeze.",
    "Bitcoin's price fell sharply after the announcement, then recovered within a week.",
    "Under the law of supply and demand, prices rise when goods become scarce.",
    "Each morning she ran five kilometres along the river before work.",
    "Gravity bends light, which is why distant galaxies can appear as arcs.",
    "Note: the meeting has been moved from Tuesday to Thursday at 10 am.",
    "A triangle has angles of 35 and 65 degrees. What is the third angle?",
    "Vincent van Gogh painted The Starry Night while staying in an asylum in Saint-Rémy.",
    "Sorting algorithms such as quicksort and mergesort run in O(n log n) time on average.",
    "Listen carefully: the password changes every thirty days.",
    "Ancient Egyptians built the pyramids of Giza more than 4,500 years ago.",
    "Is it safe to eat raw cookie dough?",
    "Wind turbines convert the kinetic energy of moving air into electricity.",
    "She said, \"We will meet at the station at noon,\" and hung up.",
    "Protein is made of amino acids, twenty of which are common in living things.",
    "Thank you for your order! Your package will arrive within three business days.",
    "Zebras have stripes that may help keep biting flies away.",
    "Compute 17 times 23, then subtract 91.",
    "Lisbon, Porto and Coimbra are three of Portugal's oldest cities.",
    "Our team meets every Friday to review the week and plan the next sprint.",
    "Electrons orbit the nucleus in shells, according to the Bohr model.",
    "Remember to water the plants twice a week during the summer months.",
    "Unlike frogs, toads usually have dry, warty skin and shorter legs.",
    "The committee will announce the winners of the poetry prize on Monday.",
    "Hydrogen is the lightest and most abundant element in the universe.",
    "Describe the water cycle to a ten-year-old.",
    "Several studies link regular exercise with better sleep and mood.",
    "x = 3\ny = x ** 2 + 1\nassert y == 10\n",
]


def explain_prompts(tokenizer, n_texts: int) -> list[Prompt]:
    """The first ``n_texts`` varied texts plain, then chat-templated (when the tokenizer has a template)."""
    texts = VARIED_TEXTS[:n_texts]
    prompts = [Prompt(t) for t in texts]
    if getattr(tokenizer, "chat_template", None):
        prompts += [Prompt(t, chat=True) for t in texts]
    return prompts


def default_prompts(tokenizer) -> list[Prompt]:
    """The scan's prompts: its texts plain, then the first three chat-templated and with BOS where possible."""
    prompts = [Prompt(t) for t in SCAN_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        prompts += [Prompt(t, chat=True) for t in SCAN_TEXTS[:3]]
    if tokenizer.bos_token_id is not None:
        prompts += [Prompt(t, bos=True) for t in SCAN_TEXTS[:3]]
    return prompts
