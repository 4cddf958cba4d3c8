import pytest

from sak.registry import Registry, UnknownNameError


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A
    assert "a" in reg and reg.names() == ["a"]


def test_unknown_name_lists_known_and_hints_imports():
    reg = Registry("widget")
    reg.register("alpha")(object)
    reg.register("beta")(int)
    with pytest.raises(UnknownNameError) as info:
        reg.get("gamma")
    message = str(info.value)
    assert "unknown widget 'gamma'" in message
    assert "alpha, beta" in message
    assert "imports:" in message and "`--import MODULE`" in message  # (the commands without a recipe take a flag)


def test_same_name_twice_is_an_error():
    reg = Registry("widget")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(float)
