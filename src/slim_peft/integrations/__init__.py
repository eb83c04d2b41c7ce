"""Bridges to other tools' formats: MoE-PEFT / mixlora adapter directories (`moe_peft.py`)."""
