from django.urls import path

from privacy.api import views

urlpatterns = [
    path("federations/<int:federation_id>/privacy-report", views.PrivacyReportView.as_view(), name="api-privacy-report"),
]
