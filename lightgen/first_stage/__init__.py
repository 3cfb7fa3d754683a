from lightgen.first_stage.identity import IdentityFirstStage

__all__ = ["IdentityFirstStage"]
