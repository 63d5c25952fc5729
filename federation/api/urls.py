from django.urls import path

from federation.api import views

urlpatterns = [
    path("enrol", views.EnrolView.as_view(), name="api-enrol"),
    path("task", views.TaskView.as_view(), name="api-task"),
    path("models/<int:version>/weights", views.ModelWeightsView.as_view(), name="api-model-weights"),
    path("updates", views.UpdateView.as_view(), name="api-updates"),
    path("nodes/me", views.NodeStatusView.as_view(), name="api-node-status"),
]
