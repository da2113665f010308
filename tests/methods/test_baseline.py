from tests.methods.contract import MethodContract


class TestBaseline(MethodContract):
    method = "baseline"
    identity_params = {}
    active_params = {}

    def test_active_setting_changes_output(self):
        """Baseline has no active setting: it is the reference."""
