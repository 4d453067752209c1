"""Logistic regression on the breast-cancer data shipped with scikit-learn (569 tumours, 30
features, malignant or benign), with standardisation.

    python examples/logistic_regression.py

fastdl.preprocessing (train_test_split, StandardScaler fitted on the training rows only),
fastdl.Sequential with one fastdl.nn.Linear (a logistic regression: binary cross-entropy on its
logit), fastdl.optim.Adam, and fastdl.metrics for the test figures. Checks test accuracy >= 0.95.
"""
import torch
from sklearn.datasets import load_breast_cancer

import fastdl
from fastdl import metrics
from fastdl.preprocessing import StandardScaler, train_test_split


def main(seed=0):
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(data.data, data.target, test_size=0.25,
                                                        random_state=seed)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    torch.manual_seed(seed)
    model = fastdl.Sequential(fastdl.nn.Linear(30, 1))
    model.compile(optimizer=fastdl.optim.Adam(model.parameters(), lr=0.01),
                  loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=40, validation_split=0.15, verbose=0)

    pred = (model.predict(x_test)[:, 0] > 0).astype(int)      # logit > 0 <=> probability > 0.5
    acc = metrics.accuracy_score(y_test, pred)
    prec = metrics.precision_score(y_test, pred)
    rec = metrics.recall_score(y_test, pred)
    print(f"test accuracy {acc:.4f}, precision {prec:.4f}, recall {rec:.4f} "
          f"(positive class: benign), on {len(y_test)} held-out tumours")
    print("confusion matrix (rows true, columns predicted):")
    print(metrics.confusion_matrix(y_test, pred))
    assert acc >= 0.95, acc
    return {"accuracy": acc, "precision": prec, "recall": rec}


if __name__ == "__main__":
    main()
