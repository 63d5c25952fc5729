from django.urls import path

from privacy import views

urlpatterns = [
    path("federations/<int:federation_id>/privacy-report", views.report_page, name="console-privacy-report"),
    path("federations/<int:federation_id>/privacy-report/download", views.report_download, name="console-privacy-report-download"),
]
