"""``python -m slim_peft.cli`` (what ``accelerate launch -m slim_peft.cli`` runs)."""

from .main import main

raise SystemExit(main())
