from django.urls import path, re_path

from federation.api import views

urlpatterns = [
    path("enrol", views.EnrolView.as_view(), name="api-enrol"),
    path("task", views.TaskView.as_view(), name="api-task"),
    path("models/<int:version>/weights", views.ModelWeightsView.as_view(), name="api-model-weights"),
    path("updates", views.UpdateView.as_view(), name="api-updates"),
    path("nodes/me", views.NodeStatusView.as_view(), name="api-node-status"),
    path("nodes/me/secret", views.NodeSecretView.as_view(), name="api-node-secret"),
    # Last: any other path under /api/v1/ gets a JSON 404, also with DEBUG on.
    re_path(r"^.*$", views.api_not_found, name="api-not-found"),
]
