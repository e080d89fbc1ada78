"""Re-export shims for nnU-Net's trainer lookup; see nnunet_margin_trainers.py."""
