"""An evaluation set written by hand: ordinary requests in the words a user would type, produced by no template or
generator, and never part of any training split (`load_prompts("handwritten", "train")` is empty). Chat questions,
coding, maths, summarisation, rewriting and multi-turn conversations, for measuring what a drafter keeps on
traffic unlike its training prompts."""

from __future__ import annotations

Prompt = str | list[dict]

HANDWRITTEN: list[Prompt] = [
    # everyday and explanatory chat
    "Explain why the sky is blue in two sentences.",
    "How does a hash table work?",
    "What should I pack for a three-day hiking trip in the mountains in early autumn?",
    "My sourdough bread comes out dense and flat. What am I probably doing wrong?",
    "Is it better to rent or buy a home? Give me the main trade-offs.",
    "Why do cats knead blankets with their paws?",
    "Give me three ideas for a birthday present for my grandmother, who loves gardening.",
    "What is the difference between weather and climate?",
    "How do noise-cancelling headphones work?",
    "I have trouble falling asleep. Any practical tips?",
    "Write a short, friendly message to a neighbour asking them to water my plants next week.",
    "What were the main causes of the French Revolution?",
    # coding
    "Write a Python function that checks whether a string is a palindrome, ignoring spaces and case.",
    "What does `git rebase` do, and when should I use it instead of `git merge`?",
    "Fix this Python code: `for i in range(len(items)): if items[i] = target: print(i)`",
    "Write a SQL query that returns the ten customers who spent the most money last year, from tables "
    "customers(id, name) and orders(customer_id, amount, created_at).",
    "Explain the difference between a process and a thread.",
    "Write a bash one-liner that counts the lines of all .py files in a directory tree.",
    "In JavaScript, what is the difference between `let`, `const` and `var`?",
    "Write a Python class for a stack with push, pop and peek, raising an error when popping an empty stack.",
    "How would you reverse a linked list in place? Show code in C.",
    # maths and reasoning
    "A train leaves at 9:40 and arrives at 13:15. How long is the journey?",
    "If I invest 2,000 euros at 3% interest compounded yearly, how much will I have after five years?",
    "What is the derivative of x^3 * sin(x)?",
    "A recipe for 4 people needs 300 g of flour. How much flour do I need for 7 people?",
    "Is 221 a prime number? Explain how you checked.",
    "Three friends split a restaurant bill of 87.60 and leave a 15% tip. How much does each pay?",
    # summarisation and rewriting
    "Summarize in one sentence: The city council met on Tuesday to discuss the new bike lanes on Main Street. "
    "Shop owners worried about losing parking spaces, while cyclists said the lanes would make the street safer. "
    "After two hours of debate, the council agreed to a six-month trial and a review next spring.",
    "Rewrite this sentence to sound more polite: 'Send me the report by tomorrow.'",
    "Turn these notes into a short paragraph: meeting moved to Thursday; budget approved; Anna leads the design "
    "review; next step is user testing in May.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
    "Translate into simple English: 'The aforementioned parties shall henceforth refrain from disclosing said "
    "information.'",
    # multi-turn conversations
    [
        {"role": "user", "content": "I want to learn to play the guitar. Where should I start?"},
        {
            "role": "assistant",
            "content": "Start with a few basic open chords, such as G, C, D and E minor, and practise switching "
            "between them slowly.",
        },
        {"role": "user", "content": "How long should I practise each day as a beginner?"},
    ],
    [
        {"role": "user", "content": "Can you recommend a good way to learn Spanish vocabulary?"},
        {"role": "assistant", "content": "Spaced-repetition flashcards work well, a few new words every day."},
        {"role": "user", "content": "What about grammar? Should I study it at the same time?"},
    ],
    [
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},
        {
            "role": "assistant",
            "content": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        },
        {"role": "user", "content": "Now make it work for very large n efficiently."},
    ],
    [
        {"role": "user", "content": "What is photosynthesis?"},
        {
            "role": "assistant",
            "content": "It is the process plants use to turn light, water and carbon dioxide into sugar and oxygen.",
        },
        {"role": "user", "content": "Why are most plants green, then?"},
    ],
]
