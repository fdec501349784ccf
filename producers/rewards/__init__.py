"""Built-in reward plug-ins: a numeric-answer verifier (:mod:`.math`) and a remote HTTP reward (:mod:`.remote`)."""
