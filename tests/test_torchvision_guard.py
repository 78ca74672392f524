from tscray._torchvision import torchvision


def test_torchvision_imports_through_the_guard_with_models_and_transforms():
    tv = torchvision()
    from torchvision.transforms import v2  # noqa: F401  (works once the guard ran)
    assert tv.models.resnet18(num_classes=3).fc.out_features == 3
