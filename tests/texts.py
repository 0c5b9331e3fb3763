"""Tiny corpora shared by the command-line tests: a play excerpt (prose mode) and a names list
(lines mode). Imported as `texts` (rootdir-relative, like cuda_target)."""

PROSE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 30
NAMES = "\n".join(["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn",
                   "abigail", "emily", "ella", "liam", "noah", "william", "james", "oliver", "benjamin",
                   "elijah", "lucas", "mason", "logan", "alexander", "ethan", "jacob", "michael"] * 5) + "\n"
